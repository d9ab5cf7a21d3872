"""Triton kernels for ISTA2 on CUDA tensors (float32, float16, bfloat16): the q/k/v RMSNorms and the
top-1 value alignment. common/ista2.py calls them for CUDA tensors when Triton imports (it ships with
the torch wheel) unless ISTA2_TRITON=0. tests/test_ista2_triton.py runs every kernel on the CPU under
the Triton interpreter (TRITON_INTERPRET=1, read when this module's kernels are defined) and compiles
each one for sm_80 (Triton's CUDA compiler and ptxas need no GPU); with a GPU it also runs them there.

All reductions and the alignment weights are computed in float32; outputs are stored in the input's
dtype. The alignment works per head (each head's d channels against the same head of every
candidate), keeps only the running best score and index of each token while it walks over the
candidates, and saves (best index int32, weight float32) per token and head for the backward, which
is two kernels: one over tokens (grad_v, and d loss / d score), one over candidates (grad of each
candidate: a sum over the tokens that chose it, written as a dot with the one-hot choice matrix,
summed in float32 partial buffers over token splits: deterministic, no atomics).

Shapes: x (rows, c) with unit channel stride and any row stride; v (rows, c) likewise, rows = m
images x T tokens, image-major; candidates (n, c); allowed (m, n) bool; h heads of d = c/h channels.
"""
import functools
import os

import torch
import triton
import triton.language as tl

# Triton 3.0's interpreter multiplies bfloat16 blocks as their raw 16-bit patterns in tl.dot, so under
# it bfloat16 tiles are widened to float32 first (exact: a product of two bf16 values fits in fp32).
INTERPRETED = os.environ.get('TRITON_INTERPRET', '0') == '1'

_TILE = 4096  # elements of a (rows, channels) tile in the RMSNorm kernels
_PARTIAL_BYTES = 64 * 2 ** 20  # bound on the float32 partial sums of the candidates' gradient


@functools.cache
def _programs_wanted(device):
    """How many programs keep the device busy: 4 per SM (a few under the interpreter)."""
    if device.type != 'cuda':
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _row_tile(c):
    block_c = triton.next_power_of_2(c)
    return max(1, min(64, _TILE // block_c)), block_c


def _dot_fp32(dtype):
    """Multiply tiles as float32 (IEEE, not TF32: the float32 path must match torch's default)."""
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


# --------------------------------------------------------------------------------------------- RMSNorm

@triton.jit
def _rms_norm_forward_kernel(x_ptr, y_ptr, inv_ptr, rows, c, x_stride, eps,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok, col_ok = r < rows, cols < c
    ok = row_ok[:, None] & col_ok[None, :]
    r = r.to(tl.int64)
    x = tl.load(x_ptr + r[:, None] * x_stride + cols[None, :], mask=ok, other=0.).to(tl.float32)
    inv = 1. / tl.sqrt(tl.sum(x * x, 1) / c + eps)
    tl.store(y_ptr + r[:, None] * c + cols[None, :], (x * inv[:, None]).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(inv_ptr + r, inv, mask=row_ok)


@triton.jit
def _rms_norm_backward_kernel(g_ptr, y_ptr, inv_ptr, gx_ptr, rows, c, g_stride, y_stride,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """From the output: grad_x = inv (g - y mean(g y)) per row."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok, col_ok = r < rows, cols < c
    ok = row_ok[:, None] & col_ok[None, :]
    r = r.to(tl.int64)
    g = tl.load(g_ptr + r[:, None] * g_stride + cols[None, :], mask=ok, other=0.).to(tl.float32)
    y = tl.load(y_ptr + r[:, None] * y_stride + cols[None, :], mask=ok, other=0.).to(tl.float32)
    inv = tl.load(inv_ptr + r, mask=row_ok, other=0.)
    gx = (g - y * (tl.sum(g * y, 1) / c)[:, None]) * inv[:, None]
    tl.store(gx_ptr + r[:, None] * c + cols[None, :], gx.to(gx_ptr.dtype.element_ty), mask=ok)


def rms_norm_forward(x, eps):
    """x (rows, c) -> y (rows, c) in x's dtype, inv_rms (rows,) float32."""
    rows, c = x.shape
    y = torch.empty(rows, c, dtype=x.dtype, device=x.device)
    inv_rms = torch.empty(rows, dtype=torch.float32, device=x.device)
    block_r, block_c = _row_tile(c)
    _rms_norm_forward_kernel[(triton.cdiv(rows, block_r),)](
        x, y, inv_rms, rows, c, x.stride(0), float(eps), BLOCK_R=block_r, BLOCK_C=block_c)
    return y, inv_rms


def rms_norm_backward(grad, y, inv_rms):
    """grad, y (rows, c): the forward's output; inv_rms (rows,) float32 -> grad_x (rows, c) in y's dtype."""
    rows, c = y.shape
    grad_x = torch.empty(rows, c, dtype=y.dtype, device=y.device)
    block_r, block_c = _row_tile(c)
    _rms_norm_backward_kernel[(triton.cdiv(rows, block_r),)](
        grad, y, inv_rms, grad_x, rows, c, grad.stride(0), y.stride(0), BLOCK_R=block_r, BLOCK_C=block_c)
    return grad_x


# ----------------------------------------------------------------------------------- top-1 alignment

@triton.jit
def _align_forward_kernel(v_ptr, cand_ptr, allowed_ptr, out_ptr, best_ptr, weight_ptr,
                          rows, tokens, n, c, d, heads, v_stride, scale,
                          DOT_FP32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """One block of BLOCK_T tokens, one head: the best allowed candidate, w = sigmoid(scale (v.r* - v.v)),
    out = v + w (r* - v)."""
    head = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dd = tl.arange(0, BLOCK_D)
    t_ok, d_ok = t < rows, dd < d
    ok = t_ok[:, None] & d_ok[None, :]
    col = head * d + dd
    image = t // tokens
    t = t.to(tl.int64)
    v = tl.load(v_ptr + t[:, None] * v_stride + col[None, :], mask=ok, other=0.)
    v32 = v.to(tl.float32)
    if DOT_FP32:
        v = v32
    top = tl.full((BLOCK_T,), float('-inf'), dtype=tl.float32)
    pick = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for start in range(0, n, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < n
        r = tl.load(cand_ptr + j[:, None] * c + col[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.)
        if DOT_FP32:
            scores = tl.dot(v, tl.trans(r.to(tl.float32)), input_precision='ieee')
        else:
            scores = tl.dot(v, tl.trans(r))  # float16/bfloat16 products, float32 sums
        allowed = tl.load(allowed_ptr + image[:, None] * n + j[None, :], mask=t_ok[:, None] & j_ok[None, :], other=0)
        scores = tl.where(allowed != 0, scores, float('-inf'))
        block_top = tl.max(scores, 1)
        # (through int64: the interpreter keeps argmax's numpy int64 under an int32 type and would store 8 bytes)
        block_pick = tl.argmax(scores, 1).to(tl.int64).to(tl.int32) + start
        better = block_top > top  # ties keep the earlier candidate
        top = tl.where(better, block_top, top)
        pick = tl.where(better, block_pick, pick)
    self_score = tl.sum(v32 * v32, 1)
    w = 1. / (1. + tl.exp((self_score - top) * scale))
    best = tl.load(cand_ptr + pick[:, None].to(tl.int64) * c + col[None, :], mask=ok, other=0.).to(tl.float32)
    out = v32 + w[:, None] * (best - v32)
    tl.store(out_ptr + t[:, None] * c + col[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(best_ptr + t * heads + head, pick, mask=t_ok)
    tl.store(weight_ptr + t * heads + head, w, mask=t_ok)


@triton.jit
def _align_backward_tokens_kernel(g_ptr, v_ptr, cand_ptr, best_ptr, weight_ptr, gv_ptr, dz_ptr,
                                  rows, c, d, heads, g_stride, v_stride, scale,
                                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """With z = v.r* - v.v and dz = dL/dw scale w (1 - w): grad_v = (1 - w) g + dz (r* - 2 v); dz is stored."""
    head = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dd = tl.arange(0, BLOCK_D)
    t_ok, d_ok = t < rows, dd < d
    ok = t_ok[:, None] & d_ok[None, :]
    col = head * d + dd
    t = t.to(tl.int64)
    g = tl.load(g_ptr + t[:, None] * g_stride + col[None, :], mask=ok, other=0.).to(tl.float32)
    v = tl.load(v_ptr + t[:, None] * v_stride + col[None, :], mask=ok, other=0.).to(tl.float32)
    pick = tl.load(best_ptr + t * heads + head, mask=t_ok, other=0)
    w = tl.load(weight_ptr + t * heads + head, mask=t_ok, other=0.)
    r = tl.load(cand_ptr + pick[:, None].to(tl.int64) * c + col[None, :], mask=ok, other=0.).to(tl.float32)
    dz = (tl.sum(g * r, 1) - tl.sum(g * v, 1)) * scale * w * (1. - w)
    gv = (1. - w)[:, None] * g + dz[:, None] * (r - 2. * v)
    tl.store(gv_ptr + t[:, None] * c + col[None, :], gv.to(gv_ptr.dtype.element_ty), mask=ok)
    tl.store(dz_ptr + t * heads + head, dz, mask=t_ok)


@triton.jit
def _align_backward_candidates_kernel(g_ptr, v_ptr, best_ptr, weight_ptr, dz_ptr, partial_ptr,
                                      rows, n, c, d, heads, g_stride, v_stride, tiles_per_split,
                                      BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Candidates j of one block, one head, the tokens of one split: sum over the tokens t that chose j of
    w_t g_t + dz_t v_t, as (one-hot choice x w) @ g + (one-hot choice x dz) @ v."""
    head, split = tl.program_id(1), tl.program_id(2)
    j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < d
    col = head * d + dd
    total = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for i in range(tiles_per_split):
        t = (split * tiles_per_split + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < rows
        ok = t_ok[:, None] & d_ok[None, :]
        t = t.to(tl.int64)
        pick = tl.load(best_ptr + t * heads + head, mask=t_ok)  # masked tokens: w = dz = 0 below
        w = tl.load(weight_ptr + t * heads + head, mask=t_ok, other=0.)
        dz = tl.load(dz_ptr + t * heads + head, mask=t_ok, other=0.)
        g = tl.load(g_ptr + t[:, None] * g_stride + col[None, :], mask=ok, other=0.).to(tl.float32)
        v = tl.load(v_ptr + t[:, None] * v_stride + col[None, :], mask=ok, other=0.).to(tl.float32)
        chose = j[:, None] == pick[None, :]  # (BLOCK_N, BLOCK_T)
        total += tl.dot(tl.where(chose, w[None, :], 0.), g, input_precision='ieee')
        total += tl.dot(tl.where(chose, dz[None, :], 0.), v, input_precision='ieee')
    j_ok = j < n
    out = partial_ptr + (split * n + j[:, None]).to(tl.int64) * c + col[None, :]
    tl.store(out, total, mask=j_ok[:, None] & d_ok[None, :])


def _align_blocks(d, n, blocks=None):
    """(BLOCK_T, BLOCK_N, BLOCK_D); `blocks` (BLOCK_T, BLOCK_N) overrides the first two (tests)."""
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs every side >= 16
    block_n = max(16, min(64, triton.next_power_of_2(n)))
    return (*(blocks or (64, block_n)), block_d)


def align_forward(v, candidates, allowed, heads, scale, blocks=None):
    """v (rows, c), candidates (n, c) in v's dtype, allowed (m, n) bool, rows = m * tokens ->
    out (rows, c) in v's dtype, best (rows, heads) int32, weight (rows, heads) float32.
    `blocks` (BLOCK_T, BLOCK_N) overrides the tile sizes (tests)."""
    rows, c = v.shape
    n, d = candidates.shape[0], c // heads
    block_t, block_n, block_d = _align_blocks(d, n, blocks)
    candidates = candidates.contiguous()
    out = torch.empty(rows, c, dtype=v.dtype, device=v.device)
    best = torch.empty(rows, heads, dtype=torch.int32, device=v.device)
    weight = torch.empty(rows, heads, dtype=torch.float32, device=v.device)
    _align_forward_kernel[(triton.cdiv(rows, block_t), heads)](
        v, candidates, allowed.contiguous().view(torch.uint8), out, best, weight,
        rows, rows // allowed.shape[0], n, c, d, heads, v.stride(0), float(scale),
        DOT_FP32=_dot_fp32(v.dtype), BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d)
    return out, best, weight


def align_backward(grad, v, candidates, best, weight, heads, scale, candidates_grad, blocks=None):
    """grad, v (rows, c); candidates (n, c); best, weight from `align_forward` -> grad_v (rows, c) in v's
    dtype, grad_candidates (n, c) in the candidates' dtype or None."""
    rows, c = v.shape
    n, d = candidates.shape[0], c // heads
    block_t, block_n, block_d = _align_blocks(d, n, blocks)
    candidates = candidates.contiguous()
    grad_v = torch.empty(rows, c, dtype=v.dtype, device=v.device)
    dz = torch.empty(rows, heads, dtype=torch.float32, device=v.device)
    _align_backward_tokens_kernel[(triton.cdiv(rows, block_t), heads)](
        grad, v, candidates, best, weight, grad_v, dz, rows, c, d, heads, grad.stride(0), v.stride(0),
        float(scale), BLOCK_T=block_t, BLOCK_D=block_d)
    if not candidates_grad:
        return grad_v, None
    tiles, candidate_blocks = triton.cdiv(rows, block_t), triton.cdiv(n, block_n)
    splits = max(1, min(_programs_wanted(v.device) // (candidate_blocks * heads), _PARTIAL_BYTES // (4 * n * c)))
    per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, per_split)
    partial = torch.empty(splits, n, c, dtype=torch.float32, device=v.device)
    _align_backward_candidates_kernel[(candidate_blocks, heads, splits)](
        grad, v, best, weight, dz, partial, rows, n, c, d, heads, grad.stride(0), v.stride(0), per_split,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d)
    return grad_v, partial.sum(0).to(candidates.dtype)
