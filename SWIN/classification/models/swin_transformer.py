"""Swin Transformer (Liu et al., 2021) with ISTA2 in every window attention.

Parameter and buffer names (including the persistent ``relative_position_index`` and
``attn_mask``) are those of the upstream model, so upstream checkpoints load strictly when ISTA2
is off. ISTA2 aligns the values of each image over all of its windows (nW * Wh * Ww tokens).
"""
import torch
import torch.utils.checkpoint
from timm.layers import DropPath, to_2tuple, trunc_normal_
from torch import nn

from common.init import trunc_normal_linear
from common.ista2 import ISTA2


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim, drop=0.):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def window_partition(x, window_size: int):
    """(B, H, W, C) -> (B * nW, window_size * window_size, C), windows of one image contiguous."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, C)


def window_reverse(windows, window_size: int, H: int, W: int):
    """(B * nW, window_size * window_size, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


class WindowAttention(nn.Module):
    """Multi-head attention inside windows with a learned relative-position bias; ISTA2 computes it."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0., proj_drop=0.,
                 ista2_args=None):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        Wh, Ww = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * Wh - 1) * (2 * Ww - 1), num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(Wh), torch.arange(Ww), indexing='ij')).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
        index = (relative[..., 0] + Wh - 1) * (2 * Ww - 1) + relative[..., 1] + Ww - 1
        self.register_buffer('relative_position_index', index)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)
        self.ista2 = ISTA2(dim, num_heads, qk_scale=self.scale, v_scale=self.scale, attn_drop_layer=self.attn_drop,
                           is_swin=True, **(ista2_args or {}))

    def forward(self, x, B: int | None = None, mask: torch.Tensor | None = None):
        """x (B * nW, N, C) for B images; mask (nW, N, N) of 0 / -100, or None."""
        N = x.shape[1]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, -1).permute(2, 0, 1)  # (heads, N, N)
        return self.proj_drop(self.proj(self.ista2(q, k, v, real_b=B, relative_position_bias=bias, mask=mask)))

    def extra_repr(self):
        return f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}'

    def flops(self, N):
        """Multiply-adds for one window of N tokens, counted as upstream (ISTA2 not included)."""
        return N * self.dim * 3 * self.dim + 2 * N * N * self.dim + N * self.dim * self.dim


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, input_resolution, num_heads, window_size=7, shift_size=0, mlp_ratio=4., qkv_bias=True,
                 qk_scale=None, drop=0., attn_drop=0., drop_path=0., norm_layer=nn.LayerNorm, ista2_args=None):
        super().__init__()
        self.dim, self.input_resolution, self.num_heads = dim, input_resolution, num_heads
        self.window_size, self.shift_size, self.mlp_ratio = window_size, shift_size, mlp_ratio
        if min(input_resolution) <= window_size:  # one window covers the map: no shifting
            self.shift_size, self.window_size = 0, min(input_resolution)
        if not 0 <= self.shift_size < self.window_size:
            raise ValueError(f'shift_size {shift_size} must lie in [0, window_size={self.window_size})')
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, to_2tuple(self.window_size), num_heads, qkv_bias, qk_scale, attn_drop, drop,
                                    ista2_args)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.register_buffer('attn_mask', self._shift_mask() if self.shift_size else None)

    def _shift_mask(self):
        """(nW, N, N): -100 between tokens that the cyclic shift brought from different regions."""
        H, W = self.input_resolution
        ws, s = self.window_size, self.shift_size
        regions = torch.zeros(1, H, W, 1)
        bands = (slice(0, -ws), slice(-ws, -s), slice(-s, None))
        for i, (h, w) in enumerate((h, w) for h in bands for w in bands):
            regions[:, h, w, :] = i
        ids = window_partition(regions, ws).squeeze(-1)  # (nW, N)
        return (ids.unsqueeze(1) - ids.unsqueeze(2) != 0).float() * -100.0

    def forward(self, x):
        H, W = self.input_resolution
        B, L, C = x.shape
        torch._assert(L == H * W, f'expected {H}x{W}={H * W} tokens; the input size must match IMG_SIZE')
        shifted = self.norm1(x).view(B, H, W, C)
        if self.shift_size:
            shifted = torch.roll(shifted, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = self.attn(window_partition(shifted, self.window_size), B=B, mask=self.attn_mask)
        shifted = window_reverse(windows, self.window_size, H, W)
        if self.shift_size:
            shifted = torch.roll(shifted, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x + self.drop_path(shifted.reshape(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self):
        return (f'dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, '
                f'window_size={self.window_size}, shift_size={self.shift_size}, mlp_ratio={self.mlp_ratio}')

    def flops(self):
        H, W = self.input_resolution
        windows = H * W / self.window_size ** 2
        return 2 * self.dim * H * W + windows * self.attn.flops(self.window_size ** 2) \
            + 2 * H * W * self.dim * self.dim * self.mlp_ratio


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated and projected: (B, H*W, C) -> (B, H/2*W/2, 2C)."""

    def __init__(self, input_resolution, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.input_resolution, self.dim = input_resolution, dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x):
        H, W = self.input_resolution
        B, _, C = x.shape
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))

    def flops(self):
        H, W = self.input_resolution
        return H * W * self.dim + (H // 2) * (W // 2) * 4 * self.dim * 2 * self.dim


class BasicLayer(nn.Module):
    """One stage: `depth` blocks alternating plain and shifted windows, then an optional PatchMerging."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio=4., qkv_bias=True,
                 qk_scale=None, drop=0., attn_drop=0., drop_path=0., norm_layer=nn.LayerNorm, downsample=None,
                 use_checkpoint=False, ista2_args=None):
        super().__init__()
        self.dim, self.input_resolution, self.depth, self.use_checkpoint = dim, input_resolution, depth, use_checkpoint
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, input_resolution, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2,
                                 mlp_ratio, qkv_bias, qk_scale, drop, attn_drop,
                                 drop_path[i] if isinstance(drop_path, list) else drop_path, norm_layer, ista2_args)
            for i in range(depth))
        self.downsample = downsample(input_resolution, dim=dim, norm_layer=norm_layer) if downsample else None

    def forward_blocks(self, x):
        """(B, H*W, C) -> the same after the blocks, before the patch merging."""
        for block in self.blocks:
            if not torch.jit.is_scripting() and self.use_checkpoint and self.training:  # TorchScript has no checkpoint
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x):
        x = self.forward_blocks(x)
        return self.downsample(x) if self.downsample is not None else x

    def flops(self):
        return sum(b.flops() for b in self.blocks) + (self.downsample.flops() if self.downsample else 0)


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size conv: (B, 3, H, W) -> (B, H/p * W/p, embed_dim)."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.patches_resolution = [self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1]]
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans, self.embed_dim = in_chans, embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else None

    def forward(self, x):
        """(B, C, H, W) -> (B, H/p * W/p, embed_dim). The size checks are torch._assert: traceable by torch.fx."""
        for axis, size in zip((2, 3), self.img_size, strict=True):
            torch._assert(x.shape[axis] == size, f'input images must be {self.img_size[0]}x{self.img_size[1]}')
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x

    def flops(self):
        Ho, Wo = self.patches_resolution
        return Ho * Wo * self.embed_dim * (self.in_chans * self.patch_size[0] * self.patch_size[1] + bool(self.norm))


class SwinTransformer(nn.Module):
    """ista2_args: one dict of ISTA2 options for every stage, or a list with one dict per stage."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4., qkv_bias=True, qk_scale=None, drop_rate=0.,
                 attn_drop_rate=0., drop_path_rate=0.1, norm_layer=nn.LayerNorm, ape=False, patch_norm=True,
                 use_checkpoint=False, fused_window_process=False, ista2_args=None):
        super().__init__()
        if fused_window_process:
            raise ValueError('fused_window_process needs upstream\'s CUDA kernel, which is not part of this project')
        stages = len(depths)
        per_stage = ista2_args if isinstance(ista2_args, list | tuple) else [ista2_args] * stages
        if len(per_stage) != stages:
            raise ValueError(f'ista2_args has {len(per_stage)} entries; expected one dict per stage ({stages})')
        self.num_classes, self.num_layers, self.embed_dim, self.ape = num_classes, stages, embed_dim, ape
        self.patch_norm, self.mlp_ratio = patch_norm, mlp_ratio
        self.num_features = int(embed_dim * 2 ** (stages - 1))
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_layer if patch_norm else None)
        self.patches_resolution = resolution = self.patch_embed.patches_resolution
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        self.pos_drop = nn.Dropout(drop_rate)
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList(
            BasicLayer(int(embed_dim * 2 ** i), (resolution[0] // 2 ** i, resolution[1] // 2 ** i), depths[i],
                       num_heads[i], window_size, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                       drop_paths[sum(depths[:i]):sum(depths[:i + 1])], norm_layer,
                       PatchMerging if i < stages - 1 else None, use_checkpoint, per_stage[i])
            for i in range(stages))
        self.norm = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(trunc_normal_linear)

    def no_weight_decay(self):
        return {'absolute_pos_embed'}

    def no_weight_decay_keywords(self):
        return {'relative_position_bias_table'}

    def _stage_tokens(self, x):
        """(B, 3, H, W) -> each stage's tokens (B, H_i*W_i, C_i) before its patch merging, the last after the final
        norm."""
        x = self.patch_embed(x)
        if hasattr(self, 'absolute_pos_embed'):  # ape (hasattr: TorchScript compiles the addition only with ape)
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        stages = []
        for layer in self.layers:
            stages.append(layer.forward_blocks(x))
            if layer.downsample is not None:
                x = layer.downsample(stages[-1])
        stages[-1] = self.norm(stages[-1])
        return stages

    def forward_stages(self, x):
        """(B, 3, H, W) -> each stage's output (B, C_i, H / 2^(i+1), W / 2^(i+1)), i = 1..4, before its patch merging
        (the last after the final norm): the feature maps a dense-prediction head takes (detection heads add a
        norm of their own to the others)."""
        return [tokens.transpose(1, 2).unflatten(2, layer.input_resolution)
                for tokens, layer in zip(self._stage_tokens(x), self.layers, strict=True)]

    def forward_features(self, x):
        return self.avgpool(self._stage_tokens(x)[-1].transpose(1, 2)).flatten(1)

    def forward(self, x):
        return self.head(self.forward_features(x))

    def flops(self):
        """Multiply-adds of one image, counted as upstream's flops() (ISTA2's alignment not included)."""
        Ho, Wo = self.patches_resolution
        return self.patch_embed.flops() + sum(layer.flops() for layer in self.layers) \
            + self.num_features * Ho * Wo // 2 ** self.num_layers + self.num_features * self.num_classes
