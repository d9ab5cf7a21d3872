"""ISTA2: inter-sample token alignment inside an attention block.

Before ordinary softmax attention runs, every value token is replaced by a soft mix of
itself and the representative value tokens of *other* images in the batch that it is
most similar to (top-k by scaled dot product). See docs/method.md for the formulas.

Shapes: ``b`` rows (images, or Swin windows), ``h`` heads of width ``d``, ``c = h*d``;
``p1`` query tokens, ``p2`` key/value tokens per row.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

NORM_TYPES = ('rmsnorm', 'layernorm')
METHODS = (None, 'v')
REP_TOKEN_TYPES = (None, 'cls', 'cls+bg', 'mean', 'random')


def _check(ok, option, value, valid):
    if not ok:
        raise ValueError(f'ISTA2: invalid {option}={value!r}; valid: {valid}')


def _check_ratio(option, value):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    _check(ok, option, value, 'a number in (0, 1]')
    return float(value)


def _check_index(option, value, rep_tkn_type):
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    _check(ok, option, value, f'a token index (int >= 0), required by rep_tkn_type={rep_tkn_type!r}')
    return value


def gather_from_ranks(x):
    """Concatenate ``x`` (m, ...) from every rank along dim 0, in rank order -> (world*m, ...).

    This rank's slice stays the live tensor, so gradients reach the local rows; rows from
    other ranks are constants. Every rank must hold the same ``m``: a mismatch raises on
    all ranks instead of hanging inside ``all_gather``.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) > 1:
        raise ValueError(f'ISTA2 across_gpus needs the same local batch on every rank, got {sizes} '
                         f'(rank order); use drop_last=True or a padding sampler')
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)


class ISTA2(nn.Module):
    """Attention over pre-projected q/k/v, with optional inter-sample alignment of v.

    Keyword-compatible with the reference implementation. ``qk_scale`` multiplies the
    q.k logits and ``v_scale`` the alignment scores; the backbones pass their attention
    scale for both. ``attn_drop_layer`` (e.g. the block's ``nn.Dropout``) is applied to
    the self-attention weights only.
    """

    def __init__(self, dim, num_heads=8, qk_scale=1., v_scale=1., attn_drop_layer=None, is_swin=False,
                 qk_norm=False, v_norm=False, norm_type='rmsnorm', ista2_method=None, attn_inter_topk=0,
                 rep_tkn_type=None, rep_tkn_ratio=None, cls_tkn_idx=None, bg_tkn_idx=None, bs_ratio=None,
                 across_gpus=False):
        super().__init__()
        _check(isinstance(num_heads, int) and num_heads > 0 and dim % num_heads == 0, 'num_heads', num_heads,
               f'a positive divisor of dim={dim}')
        _check(norm_type in NORM_TYPES, 'norm_type', norm_type, NORM_TYPES)
        _check(ista2_method in METHODS, 'ista2_method', ista2_method, METHODS)
        _check(isinstance(attn_inter_topk, int) and not isinstance(attn_inter_topk, bool) and attn_inter_topk >= 0,
               'attn_inter_topk', attn_inter_topk, 'an int >= 0')
        _check((ista2_method is None) == (attn_inter_topk == 0), 'attn_inter_topk', attn_inter_topk,
               "0 when ista2_method is None, >= 1 when ista2_method='v'")
        _check(rep_tkn_type in REP_TOKEN_TYPES, 'rep_tkn_type', rep_tkn_type, REP_TOKEN_TYPES)
        if rep_tkn_type == 'random':
            rep_tkn_ratio = _check_ratio('rep_tkn_ratio', rep_tkn_ratio)
        else:
            _check(rep_tkn_ratio is None, 'rep_tkn_ratio', rep_tkn_ratio, "None unless rep_tkn_type='random'")
        if rep_tkn_type in ('cls', 'cls+bg'):
            cls_tkn_idx = _check_index('cls_tkn_idx', cls_tkn_idx, rep_tkn_type)
        else:
            _check(cls_tkn_idx is None, 'cls_tkn_idx', cls_tkn_idx, "None unless rep_tkn_type is 'cls' or 'cls+bg'")
        if rep_tkn_type == 'cls+bg':
            bg_tkn_idx = _check_index('bg_tkn_idx', bg_tkn_idx, rep_tkn_type)
            _check(bg_tkn_idx != cls_tkn_idx, 'bg_tkn_idx', bg_tkn_idx,
                   f'an index other than cls_tkn_idx={cls_tkn_idx}')
        else:
            _check(bg_tkn_idx is None, 'bg_tkn_idx', bg_tkn_idx, "None unless rep_tkn_type='cls+bg'")
        if bs_ratio is not None:
            bs_ratio = _check_ratio('bs_ratio', bs_ratio)
        _check(isinstance(across_gpus, bool), 'across_gpus', across_gpus, 'True or False')

        self.dim, self.num_heads = dim, num_heads
        self.qk_scale, self.v_scale = qk_scale, v_scale
        self.attn_drop_layer = attn_drop_layer
        self.is_swin = is_swin
        self.ista2_method, self.attn_inter_topk = ista2_method, attn_inter_topk
        self.rep_tkn_type, self.rep_tkn_ratio = rep_tkn_type, rep_tkn_ratio
        self.cls_tkn_idx, self.bg_tkn_idx = cls_tkn_idx, bg_tkn_idx
        self.bs_ratio, self.across_gpus = bs_ratio, across_gpus
        self.random_tkn_idxs = None  # last indices drawn for rep_tkn_type='random'

        norm = nn.RMSNorm if norm_type == 'rmsnorm' else nn.LayerNorm
        self.q_norm_layer = norm(dim) if qk_norm else nn.Identity()
        self.k_norm_layer = norm(dim) if qk_norm else nn.Identity()
        self.v_norm_layer = norm(dim) if v_norm else nn.Identity()

    def extra_repr(self):
        return (f'dim={self.dim}, num_heads={self.num_heads}, ista2_method={self.ista2_method!r}, '
                f'attn_inter_topk={self.attn_inter_topk}, rep_tkn_type={self.rep_tkn_type!r}')

    def forward(self, q, k, v, real_b=None, relative_position_bias=None, mask=None):
        """q (b, p1, c), k/v (b, p2, c) -> (b, p1, c).

        real_b: images in the batch when each image spans b/real_b rows (Swin windows);
        with ``is_swin`` it defaults to b / mask.shape[0]. relative_position_bias
        (h, p1, p2) and mask (nW, p1, p2) are added to the q.k logits.
        """
        b, p1, c = q.shape
        p2, h = k.shape[1], self.num_heads
        if mask is not None and b % mask.shape[0]:
            raise ValueError(f'ISTA2: batch of {b} rows is not a multiple of the {mask.shape[0]} windows in mask')
        q = self.q_norm_layer(q).view(b, p1, h, -1).transpose(1, 2)  # (b, h, p1, d)
        k = self.k_norm_layer(k).view(b, p2, h, -1).transpose(1, 2)
        v = self.v_norm_layer(v).view(b, p2, h, -1).transpose(1, 2)
        if self.ista2_method == 'v':
            v = self._align_per_image(v, self._images_in_batch(b, real_b, mask))

        bias = self._logit_bias(relative_position_bias, mask)
        if mask is not None:  # (b, ...) -> (images, nW, ...) so the (nW, h, p1, p2) bias broadcasts
            q, k, v = (t.reshape(b // mask.shape[0], mask.shape[0], *t.shape[1:]) for t in (q, k, v))
        out = self._attend(q, k, v, bias)
        return out.reshape(b, h, p1, -1).transpose(1, 2).reshape(b, p1, c)

    def _images_in_batch(self, b, real_b, mask):
        if real_b is None:
            if not self.is_swin:
                return b
            if mask is None:
                raise ValueError('ISTA2(is_swin=True) needs real_b (images in the batch) when no shift mask '
                                 'gives the number of windows')
            real_b = b // mask.shape[0]
        if real_b <= 0 or b % real_b:
            raise ValueError(f'ISTA2: real_b={real_b} must be a positive divisor of the batch rows b={b}')
        return real_b

    @staticmethod
    def _logit_bias(relative_position_bias, mask):
        """Additive logit bias broadcastable to (b, h, p1, p2), or to (images, nW, h, p1, p2) with a mask."""
        if mask is None:
            return relative_position_bias
        mask = mask.unsqueeze(1)  # (nW, 1, p1, p2)
        return mask if relative_position_bias is None else mask + relative_position_bias

    def _attend(self, q, k, v, bias):
        """softmax(q.k * qk_scale + bias) @ v over the last two dims; leading dims are batch."""
        drop = self.attn_drop_layer
        fused_dropout = drop is None or type(drop) is nn.Dropout
        if self.rep_tkn_type != 'cls+bg' and fused_dropout:
            p = drop.p if drop is not None and drop.training else 0.
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=self.qk_scale)
        logits = (q @ k.transpose(-2, -1)) * self.qk_scale
        if self.rep_tkn_type == 'cls+bg':
            # the background query attends where the class query does not; no gradient through it
            logits[..., self.bg_tkn_idx, :] = -logits[..., self.cls_tkn_idx, :].detach()
        if bias is not None:
            logits = logits + bias
        attn = logits.softmax(-1)
        if drop is not None:
            attn = drop(attn)
        return attn @ v

    def _align_per_image(self, v, images):
        """v (b, h, p2, d) -> aligned v, same shape; the b/images rows of one image are aligned together."""
        b, h, p2, d = v.shape
        if images == b:
            return self._align(v)
        per_image = v.reshape(images, b // images, h, p2, d).transpose(1, 2).reshape(images, h, -1, d)
        aligned = self._align(per_image)
        return aligned.reshape(images, h, b // images, p2, d).transpose(1, 2).reshape(b, h, p2, d)

    def _representatives(self, v):
        """v (m, h, P, d) -> representative tokens (m, h, J, d) of each sample."""
        kind = self.rep_tkn_type
        if kind is None:
            return v
        if kind == 'mean':
            return v.mean(2, keepdim=True)
        if kind == 'cls':
            return v[:, :, [self.cls_tkn_idx]]
        if kind == 'cls+bg':
            return v[:, :, [self.cls_tkn_idx, self.bg_tkn_idx]]
        tokens = v.shape[2]
        count = math.ceil(tokens * self.rep_tkn_ratio)
        if self.training:
            order = torch.randperm(tokens, device=v.device)
        else:  # fixed at eval so that evaluation is deterministic
            order = torch.randperm(tokens, generator=torch.Generator().manual_seed(tokens)).to(v.device)
        self.random_tkn_idxs = order[:count].sort().values
        return v[:, :, self.random_tkn_idxs]

    def _align(self, v):
        """v (m, h, P, d), one row per image -> v' = w_self * v + sum_top-k w_r * r (same shape).

        Candidates r are the representatives of the other images in the pool (the local
        batch, or every rank's batch with across_gpus); w = softmax over the scaled dot
        products [v.v, v.r for the k best r].
        """
        m, h, _, d = v.shape
        reps = self._representatives(v)
        offset = 0
        if self.across_gpus and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            offset = dist.get_rank() * m
            reps = gather_from_ranks(reps)
        n, reps_per_sample = reps.shape[0], reps.shape[2]
        others = n - 1 if self.bs_ratio is None else math.ceil((n - 1) * self.bs_ratio)
        if others == 0:
            return v
        topk = min(self.attn_inter_topk, others * reps_per_sample)

        # candidate j is usable by image i when j is another image among the first `others` of them
        own = torch.arange(m, device=v.device).unsqueeze(1) + offset
        pool = torch.arange(n, device=v.device).unsqueeze(0)
        usable = (pool != own) & (pool - (pool > own).long() < others)  # (m, n)
        usable = usable.repeat_interleave(reps_per_sample, dim=1)  # (m, n*J)
        candidates = reps.transpose(0, 1).reshape(h, n * reps_per_sample, d)  # (h, n*J, d)

        scores = torch.matmul(v, candidates.unsqueeze(0).transpose(-2, -1)) * self.v_scale  # (m, h, P, n*J)
        scores = scores.masked_fill(~usable[:, None, None, :], float('-inf'))
        top_scores, top_idx = scores.topk(topk, dim=-1)  # (m, h, P, k)
        self_score = v.square().sum(-1, keepdim=True) * self.v_scale
        logits = torch.cat([self_score, top_scores], -1)  # softmax in fp32 at least, also under autocast
        weights = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
        chosen = candidates[torch.arange(h, device=v.device).view(1, h, 1, 1), top_idx]  # (m, h, P, k, d)
        return weights[..., :1] * v + (weights[..., 1:].unsqueeze(-1) * chosen).sum(-2)
