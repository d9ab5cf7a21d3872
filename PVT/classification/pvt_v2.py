"""PVTv2 classification models (Wang et al., "PVT v2", 2022) with ISTA2 in every attention block.

With ``ista2_args`` empty the parameters, their names and the outputs are those of the upstream
``pvt_v2_*`` models, so upstream checkpoints load strictly. ``ista2_args`` (a dict of
``common.ista2.ISTA2`` keywords) is applied to every block of every stage.
"""
import math
from functools import partial

import torch
from timm.layers import DropPath
from torch import nn

from common.errors import ConfigError
from common.init import trunc_normal_linear
from common.ista2 import ISTA2


class DWConv(nn.Module):
    """Depth-wise 3x3 convolution over a token grid: (B, H*W, C) -> (B, H*W, C)."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, H: int, W: int):
        x = self.dwconv(x.transpose(1, 2).reshape(x.shape[0], -1, H, W))
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> [ReLU if linear] -> DWConv -> GELU -> fc2."""

    def __init__(self, dim, hidden_dim, drop=0., linear=False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.relu = nn.ReLU() if linear else nn.Identity()
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x, H: int, W: int):
        x = self.drop(self.act(self.dwconv(self.relu(self.fc1(x)), H, W)))
        return self.drop(self.fc2(x))


class Attention(nn.Module):
    """Spatial-reduction attention; ISTA2 computes softmax(q k^T) v, aligning the reduced values.

    Keys and values come from the tokens reduced by a strided conv (sr_ratio > 1), by pooling to
    7x7 (linear), or from all tokens (sr_ratio 1).
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0., sr_ratio=1,
                 linear=False, ista2_args=None):
        super().__init__()
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.ista2 = ISTA2(dim, num_heads, qk_scale=self.scale, v_scale=self.scale, attn_drop_layer=self.attn_drop,
                           **(ista2_args or {}))
        self.linear, self.sr_ratio = linear, sr_ratio
        if linear:
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.sr = nn.Conv2d(dim, dim, 1)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def reduce(self, x, H: int, W: int):
        """(B, H*W, C) -> (B, N', C), the tokens keys and values are computed from."""
        if not hasattr(self, 'sr'):  # sr_ratio 1 (hasattr: TorchScript compiles only the branches this model takes)
            return x
        grid = x.transpose(1, 2).reshape(x.shape[0], -1, H, W)
        if hasattr(self, 'pool'):  # linear
            return self.act(self.norm(self.sr(self.pool(grid)).flatten(2).transpose(1, 2)))
        return self.norm(self.sr(grid).flatten(2).transpose(1, 2))

    def forward(self, x, H: int, W: int):
        k, v = self.kv(self.reduce(x, H, W)).chunk(2, dim=-1)
        return self.proj_drop(self.proj(self.ista2(self.q(x), k, v)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0., attn_drop=0.,
                 drop_path=0., norm_layer=nn.LayerNorm, sr_ratio=1, linear=False, ista2_args=None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop, sr_ratio, linear, ista2_args)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, linear)

    def forward(self, x, H: int, W: int):
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class OverlapPatchEmbed(nn.Module):
    """Overlapping strided conv + LayerNorm: (B, C_in, H, W) -> tokens (B, H'*W', C), H', W'."""

    def __init__(self, patch_size=7, stride=4, in_chans=3, embed_dim=768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        x = self.proj(x)
        H, W = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class PyramidVisionTransformerV2(nn.Module):
    def __init__(self, in_chans=3, num_classes=1000, embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8),
                 mlp_ratios=(4, 4, 4, 4), qkv_bias=False, qk_scale=None, drop_rate=0., attn_drop_rate=0.,
                 drop_path_rate=0., norm_layer=nn.LayerNorm, depths=(3, 4, 6, 3), sr_ratios=(8, 4, 2, 1),
                 num_stages=4, linear=False, ista2_args=None):
        super().__init__()
        self.num_classes, self.num_stages = num_classes, num_stages
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        for i in range(num_stages):
            first = sum(depths[:i])
            setattr(self, f'patch_embed{i + 1}', OverlapPatchEmbed(
                7 if i == 0 else 3, 4 if i == 0 else 2, in_chans if i == 0 else embed_dims[i - 1], embed_dims[i]))
            setattr(self, f'block{i + 1}', nn.ModuleList(
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                      drop_paths[first + j], norm_layer, sr_ratios[i], linear, ista2_args) for j in range(depths[i])))
            setattr(self, f'norm{i + 1}', norm_layer(embed_dims[i]))
        self.embed_dim = embed_dims[num_stages - 1]
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        trunc_normal_linear(m)
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        return set()  # as upstream, in effect: its list names parameters PVTv2 does not have

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_stages(self, x):
        """(B, 3, H, W) -> each stage's normalised output (B, C_i, H / 2^(i+1), W / 2^(i+1)), i = 1..4: the feature
        maps a dense-prediction head takes."""
        maps: list[torch.Tensor] = []
        # the children are patch_embed{i}, block{i}, norm{i} for each stage, then the head, told apart by what they
        # hold: TorchScript compiles no getattr(self, f'block{i}'), and its isinstance fails on modules of differing
        # configurations
        for module in self.children():
            if hasattr(module, 'proj'):  # patch_embed{i}
                x, H, W = module(x)
            elif hasattr(module, '0'):  # block{i}, a ModuleList
                for block in module:
                    x = block(x, H, W)
            elif hasattr(module, 'normalized_shape'):  # norm{i} (the head, a Linear or Identity, has none)
                x = module(x).transpose(1, 2).reshape(x.shape[0], -1, H, W)
                maps.append(x)
        return maps

    def forward_features(self, x):
        """(B, 3, H, W) -> pooled features (B, C_last)."""
        return self.forward_stages(x)[-1].flatten(2).transpose(1, 2).mean(dim=1)

    def forward(self, x):
        return self.head(self.forward_features(x))


_WIDE = dict(embed_dims=(64, 128, 320, 512))
VARIANTS = {
    'pvt_v2_b0': dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    'pvt_v2_b1': dict(_WIDE, depths=(2, 2, 2, 2)),
    'pvt_v2_b2': dict(_WIDE, depths=(3, 4, 6, 3)),
    'pvt_v2_b2_li': dict(_WIDE, depths=(3, 4, 6, 3), linear=True),
    'pvt_v2_b3': dict(_WIDE, depths=(3, 4, 18, 3)),
    'pvt_v2_b4': dict(_WIDE, depths=(3, 8, 27, 3)),
    'pvt_v2_b5': dict(_WIDE, depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
}


def create_model(name, **kwargs):
    """Build a PVTv2 variant by name (see VARIANTS); kwargs go to PyramidVisionTransformerV2."""
    if name not in VARIANTS:
        raise ConfigError(f'unknown PVTv2 model {name!r}; valid: {", ".join(VARIANTS)}')
    spec = dict(num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), qkv_bias=True, sr_ratios=(8, 4, 2, 1),
                norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return PyramidVisionTransformerV2(**{**spec, **VARIANTS[name], **kwargs})


def pvt_v2_b0(**kwargs):
    return create_model('pvt_v2_b0', **kwargs)


def pvt_v2_b1(**kwargs):
    return create_model('pvt_v2_b1', **kwargs)


def pvt_v2_b2(**kwargs):
    return create_model('pvt_v2_b2', **kwargs)


def pvt_v2_b2_li(**kwargs):
    return create_model('pvt_v2_b2_li', **kwargs)


def pvt_v2_b3(**kwargs):
    return create_model('pvt_v2_b3', **kwargs)


def pvt_v2_b4(**kwargs):
    return create_model('pvt_v2_b4', **kwargs)


def pvt_v2_b5(**kwargs):
    return create_model('pvt_v2_b5', **kwargs)
