"""ISTA2: inter-sample token alignment inside an attention block.

Before ordinary softmax attention runs, every value token is replaced by a soft mix of
itself and the representative value tokens of *other* images in the batch that it is
most similar to (top-k by scaled dot product). See docs/method.md for the formulas.

Shapes: ``b`` rows (images, or Swin windows), ``h`` heads of width ``d``, ``c = h*d``;
``p1`` query tokens, ``p2`` key/value tokens per row.
"""
import contextlib
import functools
import io
import math
import os
import shutil
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common.ista2_options import require, validate

# The fused CPU kernels (common/csrc/ista2_cpu.cpp) serve float32/float64 CPU tensors; set
# ISTA2_CPU_KERNELS=0 (or this flag to False) to run the torch code path everywhere.
CPU_KERNELS = os.environ.get('ISTA2_CPU_KERNELS', '1') != '0'


@functools.cache
def _load_cpu_kernels():
    """Build (first call on a machine, about 30 s) and load the CPU kernels; None if that fails."""
    source = os.path.join(os.path.dirname(__file__), 'csrc', 'ista2_cpu.cpp')
    base = os.environ.get('TORCH_EXTENSIONS_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'torch_extensions')
    folder = os.path.join(base, f'ista2_cpu-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}')
    build_log = io.StringIO()  # the compiler's output, shown only if the build fails
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.path.exists(os.path.join(folder, 'ista2_cpu.so')):
            print(f'ISTA2: building the fused CPU kernels into {folder} (once, about 30 s)', file=sys.stderr)
        if shutil.which('ninja') is None:  # torch looks for ninja on PATH; the pip package's is not there
            import ninja
            os.environ['PATH'] = ninja.BIN_DIR + os.pathsep + os.environ.get('PATH', '')
        with contextlib.redirect_stdout(build_log), contextlib.redirect_stderr(build_log):
            from torch.utils import cpp_extension  # its import prints a CUDA_HOME note on CPU machines
            return cpp_extension.load('ista2_cpu', [source], build_directory=folder,
                                      extra_cflags=['-O3', '-fopenmp'], extra_ldflags=['-fopenmp'])
    except Exception as error:  # no compiler, unwritable cache, ...: the torch path computes the same
        warnings.warn(f'ISTA2: the fused CPU kernels could not be built ({error}); using the slower torch code '
                      f'path. Set ISTA2_CPU_KERNELS=0 to skip the attempt. Build output:\n{build_log.getvalue()}',
                      stacklevel=3)
        return None


def _cpu_kernels(x):
    """The fused kernels if they serve tensor ``x`` (float32/64 on the CPU), else None."""
    if not CPU_KERNELS or x.device.type != 'cpu' or x.dtype not in (torch.float32, torch.float64):
        return None
    return _load_cpu_kernels()


def _rows(x):
    """x (..., c) as a 2-d (rows, c) tensor with unit channel stride, a view where possible."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


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


class _RMSNormFunction(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) [* w] over the last dim; w may be None. One fused pass on
    the CPU; elsewhere 3 passes forward and 6 backward (torch 2.4's composite nn.RMSNorm takes
    about three times as long)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        opmath = torch.promote_types(x.dtype, torch.float32)
        eps = torch.finfo(opmath).eps if eps is None else eps
        kernels = _cpu_kernels(x)
        if kernels is not None:
            y, inv_rms = kernels.rms_norm_forward(_rows(x), weight, eps)
            y, inv_rms = y.view(x.shape), inv_rms.view(*x.shape[:-1], 1)
        else:
            mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=opmath).square_().div_(x.shape[-1])
            inv_rms = mean_square.add_(eps).rsqrt_().to(x.dtype)
            y = x * inv_rms if weight is None else (x * inv_rms).mul_(weight)
        ctx.save_for_backward(x, weight, inv_rms)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, inv_rms = ctx.saved_tensors
        weight_grad = weight is not None and ctx.needs_input_grad[1]
        kernels = _cpu_kernels(x)
        if kernels is not None and grad.dtype == x.dtype:
            grad_x, grad_w = kernels.rms_norm_backward(_rows(grad), _rows(x), weight, inv_rms.reshape(-1),
                                                       weight_grad)
            return grad_x.view(x.shape), grad_w if weight_grad else None, None
        grad_times_x = (grad * x).reshape(-1, x.shape[-1])  # shared by both gradients
        if weight is None:
            dot, grad_x = grad_times_x.sum(-1), grad * inv_rms
        else:
            dot, grad_x = grad_times_x.mv(weight.to(grad.dtype)), (grad * weight).mul_(inv_rms)
        coef = dot.view(inv_rms.shape) * inv_rms.pow(3) / x.shape[-1]  # from sum_c grad * w * x per row
        grad_x.addcmul_(x, coef, value=-1)
        grad_w = grad_times_x.t().mv(inv_rms.reshape(-1)) if weight_grad else None
        return grad_x, grad_w, None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: the head-merging transpose after
    attention would otherwise send a strided gradient into the batched matmuls, which then fall
    back to one small GEMM per (row, head) on CPU (about 5x slower for Swin windows)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _AlignToBest(torch.autograd.Function):
    """Top-1 alignment, v' = (1 - w) v + w r* with w = sigmoid(s (v.r* - v.v)) and r* the best
    allowed candidate, per head. This is softmax([s v.v, s v.r*]) written as one sigmoid.

    v (m, T, c): T tokens of each of m images; candidates (n, c); allowed (m, n) bool: whether
    image i may use candidate j. Returns (m, T, c). On the CPU one fused kernel; elsewhere the
    scores and the mix are each one GEMM against the candidates laid out block-diagonally per
    head, so v is read in its (tokens, c) layout and never gathered per token, with the backward
    written out for the same reason (about 2x faster than autograd's).
    """

    @staticmethod
    @torch.autocast('cuda', enabled=False)
    @torch.autocast('cpu', enabled=False)
    def forward(ctx, v, candidates, allowed, heads, scale):
        """Runs in v's dtype (under AMP, the dtype of the norm or projection before it)."""
        ctx.heads, ctx.scale = heads, scale
        candidates = candidates.to(v.dtype)
        kernels = _cpu_kernels(v)
        ctx.fused = kernels is not None
        if ctx.fused:
            v = v.contiguous()
            out, best, weight = kernels.align_forward(v, candidates, allowed, heads, scale)
            ctx.save_for_backward(v, candidates, best, weight)
            return out
        m, tokens, c = v.shape
        n, d = candidates.shape[0], c // heads
        blocks = torch.block_diag(*candidates.view(n, heads, d).unbind(1))  # (h*n, c)
        scores = (v.reshape(-1, c) @ blocks.t()).view(m, tokens, heads, n)
        bar = torch.zeros(allowed.shape, dtype=v.dtype, device=v.device).masked_fill_(~allowed, float('-inf'))
        best_score, best = scores.add_(bar[:, None, None]).max(-1, keepdim=True)
        opmath = torch.promote_types(v.dtype, torch.float32)
        self_score = torch.linalg.vector_norm(v.view(m, tokens, heads, d), dim=-1, dtype=opmath).square_()
        weight = torch.sigmoid((best_score.squeeze(-1).to(opmath) - self_score) * scale)  # (m, T, h)
        mix = torch.zeros_like(scores).scatter_(-1, best, weight.unsqueeze(-1).to(v.dtype))
        out = v.view(m, tokens, heads, d) * (1 - weight).to(v.dtype).unsqueeze(-1)
        out = out.view(-1, c).addmm_(mix.view(-1, heads * n), blocks)
        ctx.save_for_backward(v, blocks, best, weight)
        return out.view(m, tokens, c)

    @staticmethod
    def backward(ctx, grad):
        candidates_grad = ctx.needs_input_grad[1]
        if ctx.fused:
            v, candidates, best, weight = ctx.saved_tensors
            grad_v, grad_candidates = _load_cpu_kernels().align_backward(
                grad.to(v.dtype), v, candidates, best, weight, ctx.heads, ctx.scale, candidates_grad)
            return grad_v, grad_candidates if candidates_grad else None, None, None, None
        v, blocks, best, weight = ctx.saved_tensors
        m, tokens, c = v.shape
        heads = ctx.heads
        n, d = blocks.shape[0] // heads, c // heads
        grad = grad.reshape(-1, c)
        v_heads, grad_heads = v.view(m, tokens, heads, d), grad.view(m, tokens, heads, d)
        grad_dot_best = (grad @ blocks.t()).view(m, tokens, heads, n).gather(-1, best).squeeze(-1)
        grad_weight = grad_dot_best.to(weight.dtype) - torch.linalg.vecdot(grad_heads, v_heads).to(weight.dtype)
        grad_score = grad_weight * weight * (1 - weight) * ctx.scale  # d loss / d (v.r* - v.v), (m, T, h)
        to_best = torch.zeros(m, tokens, heads, n, dtype=v.dtype, device=v.device)
        to_best = to_best.scatter_(-1, best, grad_score.unsqueeze(-1).to(v.dtype)).view(-1, heads * n)
        grad_v = grad_heads * (1 - weight).to(v.dtype).unsqueeze(-1)
        grad_v = grad_v.addcmul_(v_heads, grad_score.mul(-2).to(v.dtype).unsqueeze(-1)).view(-1, c)
        grad_v = grad_v.addmm_(to_best, blocks).view(m, tokens, c)
        grad_candidates = None
        if candidates_grad:  # w g + (d loss / d score) v, summed over the tokens that chose each
            mix = torch.zeros(m, tokens, heads, n, dtype=v.dtype, device=v.device)
            mix = mix.scatter_(-1, best, weight.unsqueeze(-1).to(v.dtype)).view(-1, heads * n)
            grad_blocks = (mix.t() @ grad).addmm_(to_best.t(), v.view(-1, c))  # (h*n, c)
            grad_candidates = grad_blocks.view(heads, n, heads, d).diagonal(dim1=0, dim2=2).permute(0, 2, 1)
            grad_candidates = grad_candidates.reshape(n, c)
        return grad_v, grad_candidates, None, None, None


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters, eps and results) with a faster hand-written backward."""

    def forward(self, x):
        if self.weight is None:
            return super().forward(x)
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class ISTA2(nn.Module):
    """Attention over pre-projected q/k/v, with optional inter-sample alignment of v.

    Keyword-compatible with the reference implementation. ``qk_scale`` multiplies the
    q.k logits and ``v_scale`` the alignment scores; the backbones pass their attention
    scale for both. ``attn_drop_layer`` (e.g. the block's ``nn.Dropout``) is applied to
    the self-attention weights only. ``options``: the keywords of
    ``common.ista2_options.OPTIONS`` (qk_norm, ista2_method, rep_tkn_type, ...), checked
    there and each kept as an attribute of the same name.
    """

    def __init__(self, dim, num_heads=8, qk_scale=1., v_scale=1., attn_drop_layer=None, is_swin=False, **options):
        super().__init__()
        require(isinstance(num_heads, int) and num_heads > 0 and dim % num_heads == 0, 'num_heads', num_heads,
                f'a positive divisor of dim={dim}')
        self.dim, self.num_heads = dim, num_heads
        self.qk_scale, self.v_scale = qk_scale, v_scale
        self.attn_drop_layer = attn_drop_layer
        self.is_swin = is_swin
        for name, value in validate(options).items():
            setattr(self, name, value)
        self.random_tkn_idxs = None  # last indices drawn for rep_tkn_type='random'

        norm = RMSNorm if self.norm_type == 'rmsnorm' else nn.LayerNorm
        self.q_norm_layer = norm(dim) if self.qk_norm else nn.Identity()
        self.k_norm_layer = norm(dim) if self.qk_norm else nn.Identity()
        self.v_norm_layer = norm(dim) if self.v_norm else nn.Identity()

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
        q, k = self._normalize_qk(q, k)
        v = self.v_norm_layer(v)
        if self.ista2_method == 'v':
            images = self._images_in_batch(b, real_b, mask)
            v = self._align(v.reshape(images, -1, c)).view(b, p2, c)
        q = q.view(b, p1, h, -1).transpose(1, 2)  # (b, h, p1, d)
        k = k.view(b, p2, h, -1).transpose(1, 2)
        v = v.view(b, p2, h, -1).transpose(1, 2)
        out = self._attend(q, k, v, self._logit_bias(relative_position_bias, mask))  # (b, h, p1, d)
        return _ContiguousGrad.apply(out).transpose(1, 2).reshape(b, p1, c)

    def _normalize_qk(self, q, k):
        """q and k through their norms. With RMSNorm, q's weight moves onto k: per channel,
        (q / rms(q) * w_q) . k_n = (q / rms(q)) . (k_n * w_q), which saves passes over q, the
        long side in PVT. The logits, and so the results, are those of the two norms."""
        if not isinstance(self.q_norm_layer, RMSNorm):
            return self.q_norm_layer(q), self.k_norm_layer(k)
        weight = self.k_norm_layer.weight * self.q_norm_layer.weight
        return (_RMSNormFunction.apply(q, None, self.q_norm_layer.eps),
                _RMSNormFunction.apply(k, weight, self.k_norm_layer.eps))

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
        """Additive q.k logit bias of shape (nW or 1, h or 1, p1, p2), or None."""
        if mask is None:
            return relative_position_bias
        mask = mask.unsqueeze(1)
        return mask if relative_position_bias is None else mask + relative_position_bias

    def _attend(self, q, k, v, bias):
        """softmax(q.k * qk_scale + bias) @ v: q (b, h, p1, d), k/v (b, h, p2, d) -> (b, h, p1, d).

        The bias's leading dim cycles over the rows of each image (Swin windows)."""
        drop = self.attn_drop_layer
        if bias is None and self.rep_tkn_type != 'cls+bg' and (drop is None or type(drop) is nn.Dropout):
            # fused kernel; with a bias that needs a gradient it would be no faster than the explicit path
            p = drop.p if drop is not None and drop.training else 0.
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.qk_scale)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # batched matmul loops over strided heads
        logits = (q @ k.transpose(-2, -1)) * self.qk_scale
        if self.rep_tkn_type == 'cls+bg':
            # the background query attends where the class query does not; no gradient through it
            logits[..., self.bg_tkn_idx, :] = -logits[..., self.cls_tkn_idx, :].detach()
        if bias is not None:
            windows = bias.shape[0] if bias.dim() == 4 else 1
            logits = (logits.unflatten(0, (-1, windows)) + bias).flatten(0, 1)
        attn = logits.softmax(-1)
        if drop is not None:
            attn = drop(attn)
        return attn @ v

    def _representatives(self, v):
        """v (m, T, c), the T tokens of each of m images -> their representatives (m, J, c)."""
        if self.rep_tkn_type is None:
            return v
        if self.rep_tkn_type == 'mean':
            return v.mean(1, keepdim=True)
        if self.rep_tkn_type == 'cls':
            return v[:, [self.cls_tkn_idx]]
        if self.rep_tkn_type == 'cls+bg':
            return v[:, [self.cls_tkn_idx, self.bg_tkn_idx]]
        count = v.shape[1]
        if self.training:
            order = torch.randperm(count, device=v.device)
        else:  # fixed at eval so that evaluation is deterministic
            order = torch.randperm(count, generator=torch.Generator().manual_seed(count)).to(v.device)
        self.random_tkn_idxs = order[:math.ceil(count * self.rep_tkn_ratio)].sort().values
        return v[:, self.random_tkn_idxs]

    def _align(self, v):
        """v (m, T, c): T tokens of each of m images -> v' = w_self * v + sum_top-k w_r * r, same shape.

        Candidates r are the representatives of the other images in the pool (the local
        batch, or every rank's batch with across_gpus); w = softmax over the scaled dot
        products [v.v, v.r for the k best r], per head.
        """
        m, tokens, c = v.shape
        h, d = self.num_heads, c // self.num_heads
        reps = self._representatives(v)
        offset = 0
        if self.across_gpus and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            offset = dist.get_rank() * m
            reps = gather_from_ranks(reps)
        n, reps_per_image = reps.shape[0], reps.shape[1]
        others = n - 1 if self.bs_ratio is None else math.ceil((n - 1) * self.bs_ratio)
        if others == 0:
            return v
        topk = min(self.attn_inter_topk, others * reps_per_image)
        # Image g may use the first `others` images of the pool other than itself: all of them lie
        # among the first others+1, and of those exactly one is barred, image min(g, others).
        candidates = reps[:others + 1].flatten(0, 1)  # ((others+1)*J, c)
        barred = (torch.arange(m, device=v.device) + offset).clamp(max=others)
        allowed = torch.ones(m, others + 1, reps_per_image, dtype=torch.bool, device=v.device)
        allowed[torch.arange(m, device=v.device), barred] = False
        allowed = allowed.flatten(1)  # (m, (others+1)*J)
        if topk == 1:
            return _AlignToBest.apply(v, candidates, allowed, h, self.v_scale)

        v_heads, candidates = v.view(m, tokens, h, d), candidates.view(-1, h, d)
        with torch.no_grad():  # which candidates win carries no gradient; their scores do, below
            scores = torch.einsum('mthd,nhd->mthn', v_heads, candidates)
            scores.masked_fill_(~allowed[:, None, None], float('-inf'))
            best = scores.topk(topk, -1).indices  # (m, T, h, k)
        head_start = torch.arange(h, device=v.device).view(h, 1) * candidates.shape[0]
        chosen = F.embedding(best + head_start, candidates.transpose(0, 1).flatten(0, 1))  # (m, T, h, k, d)
        logits = torch.cat([torch.linalg.vecdot(v_heads, v_heads).unsqueeze(-1),
                            torch.linalg.vecdot(v_heads.unsqueeze(-2), chosen)], -1) * self.v_scale
        # softmax in fp32 at least, also under autocast
        weights = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
        return torch.addcmul((weights[..., 1:, None] * chosen).sum(-2), weights[..., :1], v_heads).view(m, tokens, c)
