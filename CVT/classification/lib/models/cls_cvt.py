"""CvT (Wu et al., 2021) with ISTA2 in every attention block.

With ISTA2 off the parameter names and counts are those of upstream ``cls_cvt``. With
``rep_tkn_type='cls+bg'`` the stage that has a class token also carries a background token: a
fixed, seeded buffer (``stage{i}.bg_token``) placed before the class token, whose attention
logits are minus the class token's; stages without a class token use ``'mean'`` instead.
"""
from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from common.errors import ConfigError
from common.init import trunc_normal_linear
from common.ista2 import ISTA2
from common.ista2_options import stage_options
from common.yacs_files import check_known

BG_TOKEN_SEED = 0


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim, act_layer=nn.GELU, drop=0.):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def conv_projection(dim, kernel_size, padding, stride, method):
    """Token grid (B, C, H, W) -> tokens (B, H'*W', C): depth-wise conv + BN ('dw_bn'), average
    pooling ('avg'), or None ('linear': the tokens as they are)."""
    if method == 'dw_bn':
        return nn.Sequential(OrderedDict([
            ('conv', nn.Conv2d(dim, dim, kernel_size, stride, padding, bias=False, groups=dim)),
            ('bn', nn.BatchNorm2d(dim)), ('rearrage', nn.Flatten(2))]))
    if method == 'avg':
        return nn.Sequential(OrderedDict([
            ('avg', nn.AvgPool2d(kernel_size, stride, padding, ceil_mode=True)), ('rearrage', nn.Flatten(2))]))
    if method == 'linear':
        return None
    raise ConfigError(f'unknown QKV_PROJ_METHOD {method!r}; valid: dw_bn, avg, linear')


class Attention(nn.Module):
    """Convolutional projections of the patch tokens, linear projections, then ISTA2 attention.

    The leading `extra` tokens (class, or background + class) bypass the convolutions.
    """

    def __init__(self, dim_in, dim_out, num_heads, qkv_bias=False, attn_drop=0., proj_drop=0., method='dw_bn',
                 kernel_size=3, stride_kv=1, stride_q=1, padding_kv=1, padding_q=1, extra_tokens=0, ista2_args=None):
        super().__init__()
        self.dim, self.num_heads, self.extra_tokens = dim_out, num_heads, extra_tokens
        self.stride_kv, self.stride_q = stride_kv, stride_q
        self.scale = dim_out ** -0.5  # over the full width, as upstream
        self.conv_proj_q = conv_projection(dim_in, kernel_size, padding_q, stride_q,
                                           'linear' if method == 'avg' else method)
        self.conv_proj_k = conv_projection(dim_in, kernel_size, padding_kv, stride_kv, method)
        self.conv_proj_v = conv_projection(dim_in, kernel_size, padding_kv, stride_kv, method)
        self.proj_q = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.proj_k = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.proj_v = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim_out, dim_out)
        self.proj_drop = nn.Dropout(proj_drop)
        self.ista2 = ISTA2(dim_out, num_heads, qk_scale=self.scale, v_scale=self.scale, attn_drop_layer=self.attn_drop,
                           **(ista2_args or {}))

    def forward(self, x, h: int, w: int):
        """x (B, extra + h*w, C_in) -> (B, extra + h*w, C_out)."""
        extra, patches = x[:, :self.extra_tokens], x[:, self.extra_tokens:]
        grid = patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        # one line per projection: TorchScript iterates over no tuple of modules
        q = torch.cat([extra, self.conv_proj_q(grid).transpose(1, 2) if self.conv_proj_q is not None else patches], 1)
        k = torch.cat([extra, self.conv_proj_k(grid).transpose(1, 2) if self.conv_proj_k is not None else patches], 1)
        v = torch.cat([extra, self.conv_proj_v(grid).transpose(1, 2) if self.conv_proj_v is not None else patches], 1)
        out = self.ista2(self.proj_q(q), self.proj_k(k), self.proj_v(v))
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    def __init__(self, dim_in, dim_out, num_heads, mlp_ratio=4., qkv_bias=False, drop=0., attn_drop=0., drop_path=0.,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, **attn_kwargs):
        super().__init__()
        self.norm1 = norm_layer(dim_in)
        self.attn = Attention(dim_in, dim_out, num_heads, qkv_bias, attn_drop, drop, **attn_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim_out)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio), act_layer, drop)

    def forward(self, x, h: int, w: int):
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvEmbed(nn.Module):
    """Strided conv + norm: (B, C_in, H, W) -> (B, C, H', W')."""

    def __init__(self, patch_size=7, in_chans=3, embed_dim=64, stride=4, padding=2, norm_layer=None):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding)
        self.norm = norm_layer(embed_dim) if norm_layer else None

    def forward(self, x):
        x = self.proj(x)
        if self.norm is not None:
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(x.shape)
        return x


class VisionTransformer(nn.Module):
    """One CvT stage: (B, C_in, H, W) -> grid (B, C, H', W') and its class token (B, 1, C) or None."""

    def __init__(self, patch_size=16, patch_stride=16, patch_padding=0, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4., qkv_bias=False, drop_rate=0., attn_drop_rate=0., drop_path_rate=0.,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, init='trunc_norm', with_cls_token=False,
                 bg_token_seed=None, **attn_kwargs):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = ConvEmbed(patch_size, in_chans, embed_dim, patch_stride, patch_padding, norm_layer)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if with_cls_token else None
        if bg_token_seed is not None:
            if not with_cls_token:
                raise ValueError('a background token needs a class token in the same stage')
            bg = nn.init.trunc_normal_(torch.empty(1, 1, embed_dim), std=.02, a=-2., b=2.,
                                       generator=torch.Generator().manual_seed(bg_token_seed))
            self.register_buffer('bg_token', bg)  # fixed and seeded: saved in checkpoints, the same on every rank
        else:
            self.bg_token = None
        self.pos_drop = nn.Dropout(drop_rate)
        drop_paths = torch.linspace(0, drop_path_rate, depth).tolist()
        extra = int(with_cls_token) + int(bg_token_seed is not None)
        self.blocks = nn.ModuleList(
            Block(embed_dim, embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_paths[j],
                  act_layer, norm_layer, extra_tokens=extra, **attn_kwargs) for j in range(depth))
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_xavier if init == 'xavier' else trunc_normal_linear)

    @staticmethod
    def _init_xavier(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x)
        B, C, H, W = x.shape
        tokens = [x.flatten(2).transpose(1, 2)]
        one_per_image = tokens[0][:, :1]  # (B, 1, C): what the extra tokens expand to (fx-traceable, unlike B)
        if self.cls_token is not None:
            tokens.insert(0, self.cls_token.expand_as(one_per_image))
        if self.bg_token is not None:
            tokens.insert(0, self.bg_token.expand_as(one_per_image))
        x = self.pos_drop(torch.cat(tokens, dim=1))
        for block in self.blocks:
            x = block(x, H, W)
        cls = x[:, -H * W - 1:-H * W] if self.cls_token is not None else None
        return x[:, -H * W:].transpose(1, 2).reshape(B, C, H, W), cls


def stage_ista2_args(options, with_cls_token):
    """One stage's ISTA2 keywords (from `stage_options`) -> the same with the token indices set, and whether the
    stage carries a background token.

    'cls' / 'cls+bg' need the stage's class token (at index 0, after the background token at
    index 0 for 'cls+bg'); a stage without one falls back to 'mean'.
    """
    kind = options['rep_tkn_type']
    cls_idx = bg_idx = None
    if kind in ('cls', 'cls+bg'):
        if not with_cls_token:
            kind = 'mean'
        elif kind == 'cls':
            cls_idx = 0
        else:
            bg_idx, cls_idx = 0, 1
    return dict(options, rep_tkn_type=kind, cls_tkn_idx=cls_idx, bg_tkn_idx=bg_idx), bg_idx is not None


# MODEL.SPEC: the per-stage lists the model reads, and its other keys
STAGE_KEYS = ('PATCH_SIZE', 'PATCH_STRIDE', 'PATCH_PADDING', 'DIM_EMBED', 'DEPTH', 'NUM_HEADS', 'MLP_RATIO', 'QKV_BIAS',
              'DROP_RATE', 'ATTN_DROP_RATE', 'DROP_PATH_RATE', 'CLS_TOKEN', 'QKV_PROJ_METHOD', 'KERNEL_QKV',
              'PADDING_Q', 'PADDING_KV', 'STRIDE_KV', 'STRIDE_Q')
SPEC_KEYS = ('INIT', 'NUM_STAGES', 'POS_EMBED', *STAGE_KEYS)
INITS = ('trunc_norm', 'xavier')


def check_spec(spec):
    """Refuse a MODEL.SPEC the model would misread. The node accepts new keys (as upstream), so a
    mistyped key would otherwise be ignored silently."""
    check_known(spec, 'MODEL.SPEC', SPEC_KEYS)
    missing = [key for key in ('NUM_STAGES', *STAGE_KEYS) if key not in spec]
    if missing:
        raise ConfigError(f'MODEL.SPEC lacks {", ".join(missing)}')
    stages = spec['NUM_STAGES']
    for key in (*STAGE_KEYS, 'POS_EMBED'):
        values = spec.get(key, [False] * stages)
        if not isinstance(values, list | tuple) or len(values) != stages:
            raise ConfigError(f'MODEL.SPEC.{key}={values!r}: give one value per stage (NUM_STAGES={stages})')
    if any(spec.get('POS_EMBED', ())):
        raise ConfigError(f'MODEL.SPEC.POS_EMBED={spec["POS_EMBED"]!r}: CvT has no position embedding (upstream '
                          f'ignores the key); set it to false for every stage')
    if spec.get('INIT', 'trunc_norm') not in INITS:
        raise ConfigError(f'MODEL.SPEC.INIT={spec["INIT"]!r}; valid: {", ".join(INITS)}')


class ConvolutionalVisionTransformer(nn.Module):
    """spec: the MODEL.SPEC node (per-stage lists); ista2: the MODEL.ISTA2 node."""

    def __init__(self, in_chans=3, num_classes=1000, act_layer=nn.GELU, norm_layer=nn.LayerNorm, init='trunc_norm',
                 spec=None, ista2=None):
        super().__init__()
        check_spec(spec)
        self.num_classes, self.num_stages = num_classes, spec['NUM_STAGES']
        for i, options in enumerate(stage_options(ista2, self.num_stages)):
            ista2_args, with_bg = stage_ista2_args(options, spec['CLS_TOKEN'][i])
            stage = VisionTransformer(
                patch_size=spec['PATCH_SIZE'][i], patch_stride=spec['PATCH_STRIDE'][i],
                patch_padding=spec['PATCH_PADDING'][i], in_chans=in_chans, embed_dim=spec['DIM_EMBED'][i],
                depth=spec['DEPTH'][i], num_heads=spec['NUM_HEADS'][i], mlp_ratio=spec['MLP_RATIO'][i],
                qkv_bias=spec['QKV_BIAS'][i], drop_rate=spec['DROP_RATE'][i],
                attn_drop_rate=spec['ATTN_DROP_RATE'][i], drop_path_rate=spec['DROP_PATH_RATE'][i],
                act_layer=act_layer, norm_layer=norm_layer, init=init, with_cls_token=spec['CLS_TOKEN'][i],
                bg_token_seed=BG_TOKEN_SEED + i if with_bg else None, method=spec['QKV_PROJ_METHOD'][i],
                kernel_size=spec['KERNEL_QKV'][i], padding_q=spec['PADDING_Q'][i], padding_kv=spec['PADDING_KV'][i],
                stride_kv=spec['STRIDE_KV'][i], stride_q=spec['STRIDE_Q'][i], ista2_args=ista2_args)
            setattr(self, f'stage{i}', stage)
            in_chans = spec['DIM_EMBED'][i]
        dim = spec['DIM_EMBED'][-1]
        self.norm = norm_layer(dim)
        self.cls_token = spec['CLS_TOKEN'][-1]
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)

    def no_weight_decay(self):
        return {f'stage{i}.{name}' for i in range(self.num_stages) for name in ('pos_embed', 'cls_token')}

    def _stages(self, x):
        """(B, 3, H, W) -> [(stage i's map (B, C_i, H_i, W_i), its class token (B, 1, C_i) or None)]."""
        stages: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        # the children are stage0, stage1, ... then the norm and the head, told apart by hasattr: TorchScript compiles
        # no getattr(self, f'stage{i}'), and isinstance fails on modules of differing configs
        for stage in self.children():
            if hasattr(stage, 'blocks'):
                stages.append(stage(stages[-1][0] if stages else x))
        return stages

    def forward_stages(self, x):
        """(B, 3, H, W) -> each stage's output map (B, C_i, H / s_i, W / s_i), strides 4, 8, 16 for CvT-13: the
        feature maps a dense-prediction head takes (not normalised: the model's norm acts on the class token)."""
        return [x for x, _ in self._stages(x)]

    def forward_features(self, x):
        """(B, 3, H, W) -> (B, C): the normalised class token, or the mean normalised patch token."""
        x, cls = self._stages(x)[-1]
        if cls is not None:
            return self.norm(cls).flatten(1)
        return self.norm(x.flatten(2).transpose(1, 2)).mean(1)

    def forward(self, x):
        return self.head(self.forward_features(x))


def build_cvt(config):
    """The model MODEL.SPEC and MODEL.ISTA2 describe, with QuickGELU and fp32 LayerNorm as upstream."""
    return ConvolutionalVisionTransformer(
        in_chans=3, num_classes=config.MODEL.NUM_CLASSES, act_layer=QuickGELU,
        norm_layer=partial(LayerNorm, eps=1e-5), init=config.MODEL.SPEC.get('INIT', 'trunc_norm'),
        spec=config.MODEL.SPEC, ista2=config.MODEL.ISTA2)
