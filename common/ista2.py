"""ISTA2: inter-sample token alignment inside an attention block.

Before ordinary softmax attention runs, every value token is replaced by a soft mix of
itself and the representative value tokens of *other* images in the batch that it is
most similar to (top-k by scaled dot product). See docs/method.md for the formulas.

Shapes: ``b`` rows (images, or Swin windows), ``h`` heads of width ``d``, ``c = h*d``;
``p1`` query tokens, ``p2`` key/value tokens per row.

torch.jit.script compiles the torch code path: the autograd Functions, kernels and process-group calls sit under
``if not torch.jit.is_scripting()`` (a branch TorchScript drops), and options that are None are tested with
``is None``, which TorchScript decides while compiling (docs/design.md).
"""
import contextlib
import fcntl
import functools
import hashlib
import io
import math
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models import register_notrace_module
from torch import nn

from common.ista2_options import require, validate

# The fused CPU kernels (common/csrc/ista2_cpu.cpp) serve float32/float64 CPU tensors; set
# ISTA2_CPU_KERNELS=0 (or this flag to False) to run the torch code path everywhere.
CPU_KERNELS = os.environ.get('ISTA2_CPU_KERNELS', '1') != '0'
# The Triton kernels (common/ista2_triton.py) serve float32/float16/bfloat16 tensors on the device types
# in TRITON_DEVICES (the tests add 'cpu' under the Triton interpreter); set ISTA2_TRITON=0 (or this flag
# to False) to run the torch code path there instead.
TRITON = os.environ.get('ISTA2_TRITON', '1') != '0'
TRITON_DEVICES = ('cuda',)
# The torch code path of the alignment works through the tokens in chunks whose transient tensors (the
# scores against every candidate, the gathered winners and a few temporaries of the tokens' width) take
# at most this many bytes: unchunked, the scores of a Swin-T stage-1 block at 128 images take 600 MB in
# float32. Under 32 MiB, glibc (as tuned by common.runtime.tune_cpu) also serves every chunk from reused
# heap memory instead of fresh pages.
CHUNK_BYTES = 16 * 2 ** 20


@functools.cache
def _load_cpu_kernels():
    """Build (first call on a machine, about 30 s) and load the CPU kernels; None if that fails."""
    source = os.path.join(os.path.dirname(__file__), 'csrc', 'ista2_cpu.cpp')
    base = os.environ.get('TORCH_EXTENSIONS_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'torch_extensions')
    # one folder per torch, Python and checkout: the build file names the source by its path, so checkouts that
    # shared a folder would rebuild each other's kernels
    checkout = hashlib.sha256(source.encode()).hexdigest()[:8]
    python = f'py{sys.version_info[0]}{sys.version_info[1]}'
    folder = os.path.join(base, f'ista2_cpu-torch{torch.__version__}-{python}-{checkout}')
    build_log = io.StringIO()  # the compiler's output, shown only if the build fails
    try:
        os.makedirs(folder, exist_ok=True)
        with _build_lock(folder):
            if not os.path.exists(os.path.join(folder, 'ista2_cpu.so')):
                print(f'ISTA2: building the fused CPU kernels into {folder} (once, about 30 s)', file=sys.stderr)
            with _environment_ninja(), contextlib.redirect_stdout(build_log), contextlib.redirect_stderr(build_log):
                from torch.utils import cpp_extension  # its import prints a CUDA_HOME note on CPU machines
                return cpp_extension.load('ista2_cpu', [source], build_directory=folder,
                                          extra_cflags=['-O3', '-fopenmp'], extra_ldflags=['-fopenmp'])
    except Exception as error:  # no compiler, unwritable cache, ...: the torch path computes the same
        warnings.warn(f'ISTA2: the fused CPU kernels could not be built ({error}); using the slower torch code '
                      f'path. Set ISTA2_CPU_KERNELS=0 to skip the attempt. Build output:\n{build_log.getvalue()}',
                      stacklevel=3)
        return None


@contextlib.contextmanager
def _build_lock(folder):
    """Hold ``folder``'s lock (flock on its file ista2.lock) while the kernels are built or loaded from there.
    The operating system releases it when its holder dies. torch 2.4's own lock, a file named ``lock`` whose mere
    existence blocks and that only the process that made it removes, is then stale whenever ours is held: a build
    killed halfway (Ctrl-C, a job's time limit) left it behind, and every later process waited on it forever. It
    is removed here (later torch releases flock that file too, and take it again)."""
    with open(os.path.join(folder, 'ista2.lock'), 'a') as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process holds it: loading takes a second, building about 30
            if not os.path.exists(os.path.join(folder, 'ista2_cpu.so')):
                print(f'ISTA2: waiting for another process building the CPU kernels in {folder}', file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, 'lock'))
        yield  # closing the file releases the lock


@contextlib.contextmanager
def _environment_ninja():
    """Put the ninja of the Python environment (the `ninja` package) first on PATH, where torch looks for it,
    for the duration of a build. Another ninja found first on PATH (a system one, or the venv's bin/ missing
    from PATH) may be another version, and ninja 1.11 and 1.13 cannot read each other's build log: processes
    alternating between them rebuild the kernels every time (25-50 s per process start)."""
    try:
        import ninja
    except ImportError:  # no package: whatever ninja PATH has
        yield
        return
    path = os.environ.get('PATH', '')
    os.environ['PATH'] = ninja.BIN_DIR + os.pathsep + path
    try:
        yield
    finally:
        os.environ['PATH'] = path


def _exporting_onnx():
    """Whether an ONNX exporter records this call (within `_tracing`): ISTA2 then also avoids the ops that either
    exporter writes wrongly (`ISTA2._attend`, `ISTA2._mix`)."""
    if torch.jit.is_scripting():
        return False
    else:
        return torch.onnx.is_in_onnx_export()


def _tracing():
    """Whether a tracer records this call rather than running it: torch.compile, torch.export (and so the ONNX
    exporter of torch 2.5 and later, built on it), torch.jit.trace, or the TorchScript-based ONNX exporter (torch
    2.4's default). A tracer sees neither the fused kernels (opaque calls) nor a number read on the host (it would
    become a constant), so ISTA2 then runs its torch code path, unchunked, and reads the bank's fill on the device.
    TorchScript (torch.jit.script) counts as one: it compiles that code path, for every shape, without the autograd
    Functions (each call site says what it runs instead)."""
    if torch.jit.is_scripting():
        return True
    else:
        return torch.compiler.is_compiling() or torch.jit.is_tracing() or _exporting_onnx()


def _cpu_kernels(x):
    """The fused kernels if they serve tensor ``x`` (float32/64 on the CPU), else None (also under a tracer,
    `_tracing`, which records the torch code path instead)."""
    if not CPU_KERNELS or x.device.type != 'cpu' or x.dtype not in (torch.float32, torch.float64) or _tracing():
        return None
    return _load_cpu_kernels()


@functools.cache
def _load_triton_kernels():
    """common.ista2_triton, or None (with a warning) if Triton cannot be imported."""
    try:
        from common import ista2_triton
    except Exception as error:  # e.g. a torch wheel without Triton: the torch path computes the same
        warnings.warn(f'ISTA2: the Triton kernels could not be loaded ({error}); using the torch code path. '
                      f'Set ISTA2_TRITON=0 to skip the attempt.', stacklevel=3)
        return None
    return ista2_triton


@functools.cache
def _triton_serves(device, dtype):
    """Triton 3.0 compiles for compute capability 7.0 and up, bfloat16 products from 8.0."""
    if device.type != 'cuda':
        return True
    capability = torch.cuda.get_device_capability(device)
    return capability >= (8, 0) or (capability >= (7, 0) and dtype != torch.bfloat16)


# Outcome of the Triton kernels' self-check per (device type, dtype), filled by `triton_in_use`: True where
# they serve, False where they raised or disagreed with the torch code path, which then serves instead.
TRITON_PROBES = {}
# Largest error the self-check allows, relative to the largest magnitude of the result: 3x the largest seen
# against the float64 torch code path over 20 seeds of its inputs, under the Triton interpreter (float32
# 3.9e-7, float16 4.3e-4, bfloat16 7.3e-3; the interpreter of Triton 3.0 to 3.8 truncates to bfloat16 where a
# GPU rounds to nearest). Not yet measured on a GPU.
PROBE_TOLERANCE = {torch.float32: 1.2e-6, torch.float16: 1.3e-3, torch.bfloat16: 2.2e-2}


def triton_in_use(device, dtype):
    """Whether the Triton kernels serve ISTA2's RMSNorms and top-1 alignment for `dtype` tensors on `device`:
    float32/16 or bfloat16 on a TRITON_DEVICES device, the kernels loaded, and their self-check passed. The
    first such call per (device type, dtype) in a process runs the check (`_triton_probe`); if it fails, a
    warning says why and the torch code path serves those tensors from then on."""
    device = torch.device(device)
    if not TRITON or device.type not in TRITON_DEVICES or dtype not in PROBE_TOLERANCE \
            or not _triton_serves(device, dtype) or _load_triton_kernels() is None:
        return False
    key = (device.type, dtype)
    if key not in TRITON_PROBES:
        failure = _triton_probe(device, dtype)
        if failure is not None:
            warnings.warn(f'ISTA2: the Triton kernels failed their self-check on {device.type} {dtype} ({failure}); '
                          f'using the torch code path for these tensors. Set ISTA2_TRITON=0 to skip the attempt.',
                          stacklevel=2)
        TRITON_PROBES[key] = failure is None
    return TRITON_PROBES[key]


def _triton_probe(device, dtype):
    """Why the Triton kernels must not serve `dtype` on `device`, or None: their RMSNorm and top-1 alignment,
    forward and backward, on 3 images x 12 tokens, 2 heads of 16 channels and 3 candidates, against the torch
    code path on the same inputs in float64 (immune to TF32 and to its own rounding). The inputs come from a
    generator of their own (the global random state is untouched); each token is 0.6 x one allowed candidate
    plus noise, the candidates orthogonal, so its winner scores about 0.6 d against 0 +- 0.2 sqrt(d) for the
    others and every path must pick it."""
    images, tokens, heads, d = 3, 12, 2, 16
    generator = torch.Generator().manual_seed(0)
    candidates = torch.linalg.qr(torch.randn(heads, d, d, generator=generator)).Q[..., :images].permute(2, 0, 1)
    candidates = candidates * d ** 0.5  # (n, h, d), per head orthogonal rows of norm sqrt(d)
    allowed = ~torch.eye(images, dtype=torch.bool, device=device)  # image i may not use candidate i
    chosen = (torch.arange(images).view(-1, 1, 1) + torch.randint(1, images, (images, tokens, heads),
                                                                   generator=generator)) % images
    v = 0.6 * candidates[chosen, torch.arange(heads)] + 0.2 * torch.randn(images, tokens, heads, d, generator=generator)
    grad = torch.randn(images * tokens, heads * d, generator=generator)
    scale, eps = d ** -0.5, torch.finfo(torch.float32).eps

    def results(norm_forward, norm_backward, align_forward, align_backward, precision):
        """(y, grad_x, out, grad_v, grad_candidates) of one path, on the inputs rounded to dtype."""
        x, g, r = (t.reshape(-1, heads * d).to(device, dtype).to(precision) for t in (v, grad, candidates))
        y, inv_rms = norm_forward(x, eps)
        out, best, mix_weight = align_forward(x, r, allowed, heads, scale)
        return (y, norm_backward(g, y, inv_rms.view(-1, 1)), out,
                *align_backward(g, x, r, best, mix_weight, heads, scale, True))

    kernels = _load_triton_kernels()
    try:
        with torch.autocast(device.type, enabled=False):
            found = results(kernels.rms_norm_forward, kernels.rms_norm_backward, kernels.align_forward,
                            kernels.align_backward, dtype)
            expected = results(_rms_norm, _rms_norm_backward, _align_to_best, _align_to_best_backward, torch.float64)
    except Exception as error:
        first_line = str(error).partition('\n')[0]
        return f'{type(error).__name__}: {first_line}'
    names = ('RMSNorm y', 'RMSNorm grad_x', 'alignment out', 'alignment grad_v', 'alignment grad_candidates')
    for name, result, reference in zip(names, found, expected, strict=True):
        error = ((result.double() - reference).abs().max() / reference.abs().max()).item()
        if not error <= PROBE_TOLERANCE[dtype]:  # NaN included
            return f'{name} differs from the torch code path by {error:.1e} of its largest magnitude, ' \
                   f'over the tolerance of {PROBE_TOLERANCE[dtype]:.1e}'
    return None


def _triton_kernels(x):
    """The Triton kernels if they serve tensor ``x`` (`triton_in_use`), else None (also under a tracer)."""
    if _tracing():
        return None
    return _load_triton_kernels() if triton_in_use(x.device, x.dtype) else None


def _rows(x):
    """x (..., c) as a 2-d (rows, c) tensor with unit channel stride (as the kernels need), a view where possible.
    Under a tracer (the torch code path, any strides) the reshape alone."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if _tracing() or rows.stride(-1) == 1 else rows.contiguous()


def _distributed():
    """Whether a process group of more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
    """y = x / sqrt(mean(x^2) + eps) over the last dim, differentiated from its output: it keeps y (which the
    attention keeps anyway, so no storage of its own) and one inverse RMS per row, not x. The norms' weights are
    applied where their outputs are used (`ISTA2._attend`, `_AlignToBest`), so that y stays the unweighted one.
    One fused pass each way on the CPU (float32/64) and on CUDA (Triton; float32/16, bfloat16, summed in
    float32); elsewhere torch code (`_rms_norm`, `_rms_norm_backward`).

    background (cls, bg) or None: token bg of x (..., tokens, c) is ISTA2's background query, which attends where
    the class query does not (`ISTA2._attend`): its row of y becomes minus the class token's, written into y itself
    (no copy for the attention to keep), and takes no gradient (the reference's rule)."""

    @staticmethod
    def forward(ctx, x, eps, background=None):
        opmath = torch.promote_types(x.dtype, torch.float32)
        eps = torch.finfo(opmath).eps if eps is None else eps
        kernels = _cpu_kernels(x)
        triton_kernels = None if kernels is not None else _triton_kernels(x)
        ctx.path = 'cpu' if kernels is not None else 'triton' if triton_kernels is not None else 'torch'
        if ctx.path == 'torch':
            y, inv_rms = _rms_norm(x, eps)
        else:  # inv_rms: (rows,), in x's dtype on the CPU, float32 from Triton
            y, inv_rms = (kernels or triton_kernels).rms_norm_forward(_rows(x), eps)
            y = y.view(x.shape)
        ctx.background = background
        if background is not None:
            cls, bg = background
            y[..., bg, :] = -y[..., cls, :]
        ctx.save_for_backward(y, inv_rms)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, inv_rms = ctx.saved_tensors
        if ctx.background is not None:
            grad = grad.clone()
            grad[..., ctx.background[1], :] = 0
        if ctx.path == 'torch' or grad.dtype != y.dtype:
            return _rms_norm_backward(grad, y, inv_rms.view(*y.shape[:-1], 1)), None, None
        kernels = _load_cpu_kernels() if ctx.path == 'cpu' else _load_triton_kernels()
        return kernels.rms_norm_backward(_rows(grad), _rows(y), inv_rms).view(y.shape), None, None


def _rms_norm(x, eps):
    """The torch code of `_RMSNormFunction`'s forward: x (..., c) -> y (..., c), inv_rms (..., 1) in x's dtype."""
    opmath = torch.promote_types(x.dtype, torch.float32)
    mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=opmath).square_().div_(x.shape[-1])
    inv_rms = mean_square.add_(eps).rsqrt_().to(x.dtype)
    return x * inv_rms, inv_rms


def _rms_norm_backward(grad, y, inv_rms):
    """The torch code of `_RMSNormFunction`'s backward, from its output: grad, y (..., c), inv_rms (..., 1) ->
    grad_x = inv_rms (grad - y mean(grad y)), (..., c) in grad's dtype."""
    mean = torch.linalg.vecdot(grad, y.to(grad.dtype)).unsqueeze_(-1).div_(y.shape[-1])
    return (grad - y * mean).mul_(inv_rms)


def _scaled(x, weight: torch.Tensor | None):
    """x (..., c) times a norm's weight (c, or broadcastable) in x's dtype (under autocast, the dtype the norm
    ran in), or x. Without autograd of its own: see `_weighted`."""
    return x if weight is None else x * weight.to(x.dtype)


def _weight_grad(grad, x, weight):
    """d loss / d weight of y = x * weight from grad (the shape of x): the products and their sum in float32 at
    least, as the hand-written norm kernels summed them, -> the weight's shape and dtype."""
    opmath = torch.promote_types(grad.dtype, torch.float32)
    product = grad.to(opmath) * x.to(opmath)
    return product.sum_to_size(weight.shape).to(weight.dtype)


class _WeightProduct(torch.autograd.Function):
    """`_scaled` with autograd: keeps x (a norm's output, kept by the norm anyway) and the weight, not the
    product, and sums the weight's gradient in float32 at least (`_weight_grad`)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _scaled(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_weight = _weight_grad(grad, x, weight) if ctx.needs_input_grad[1] else None
        return _scaled(grad, weight), grad_weight


def _weighted(x, weight: torch.Tensor | None):
    """x times a norm's weight as autograd sees it (`_WeightProduct`; plain torch under a tracer), or x."""
    if weight is None:
        return x
    if not torch.jit.is_scripting():
        if not _tracing():
            return _WeightProduct.apply(x, weight)
    return _scaled(x, weight)


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


def _contiguous_scaled(x, weight):
    """`_scaled`, written into a new contiguous tensor in one pass."""
    if weight is None:
        return x.contiguous()
    return torch.mul(x, weight.to(x.dtype), out=torch.empty(x.shape, dtype=x.dtype, device=x.device))


class _Logits(torch.autograd.Function):
    """q . (k * weight) * scale: q (b, h, p1, d), k (b, h, p2, d) of any strides (the heads of the norms'
    token-major outputs), weight (h, 1, d) or None -> (b, h, p1, p2). Keeps q, k and the weight as they are,
    which the norms keep anyway, where autograd would keep contiguous copies of q and k * weight (the batched
    products want contiguous operands on the CPU); the backward makes those again."""

    @staticmethod
    def forward(ctx, q, k, weight, scale):
        ctx.save_for_backward(q, k, weight)
        logits = torch.matmul(q.contiguous(), _contiguous_scaled(k, weight).transpose(-2, -1)).mul_(scale)
        ctx.scale, ctx.dtype = scale, logits.dtype  # under autocast, the dtype the product ran in
        return logits

    @staticmethod
    def backward(ctx, grad):
        q, k, weight = ctx.saved_tensors
        q, k = q.to(ctx.dtype), k.to(ctx.dtype)
        grad = grad.to(ctx.dtype) * ctx.scale
        grad_q = torch.matmul(grad, _contiguous_scaled(k, weight)) if ctx.needs_input_grad[0] else None
        grad_k = grad_weight = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_k = torch.matmul(grad.transpose(-2, -1), q.contiguous())  # d logits / d (k * weight)
            if ctx.needs_input_grad[2]:
                grad_weight = _weight_grad(grad_k, k, weight)
            if weight is not None:
                grad_k = grad_k.mul_(weight.to(grad_k.dtype))
        return grad_q, grad_k, grad_weight, None


def _logits(q, k, weight: torch.Tensor | None, scale: float):
    """`_Logits`, or under a tracer (`_tracing`) the same products in plain torch."""
    if not torch.jit.is_scripting():
        if not _tracing():
            return _Logits.apply(q, k, weight, scale)
    return torch.matmul(q, _scaled(k, weight).transpose(-2, -1)) * scale


class _AlignToBest(torch.autograd.Function):
    """Top-1 alignment, v' = (1 - w) v + w r* with w = sigmoid(s (v.r* - v.v)) and r* the best
    allowed candidate, per head. This is softmax([s v.v, s v.r*]) written as one sigmoid.

    v = v_hat * norm_weight: v_hat (m, T, c), T tokens of each of m images (the v norm's output, which that
    norm keeps too), times its weight (c,) or None; candidates (n, c); allowed (m, n) bool: whether image i may
    use candidate j. Returns (m, T, c) and the winners (m, T, h) (no gradient). Three implementations of the
    same numbers: the fused CPU kernels (float32/64 CPU tensors), the Triton kernels (float32/16 and bfloat16
    CUDA tensors), else torch code (`_align_to_best`). Each keeps for the backward v_hat, the weight, the
    candidates and, per token and head, only the winner's index and weight; v is made again in the backward
    (one product), and the backward is written out by hand. Also returns the mix weights w (m, T, h), which
    with the winners make v' again (`_aligned_values`; no gradient through either).
    """

    @staticmethod
    def forward(ctx, v_hat, norm_weight, candidates, allowed, heads, scale):
        """Runs in v_hat's dtype (under AMP, the dtype of the norm or projection before it, with autocast off);
        scores, weights and sums in float32 at least. Without grad, as eager autograd runs it anyway (said
        here for torch.compile, which traces it)."""
        with torch.autocast('cuda', enabled=False), torch.autocast('cpu', enabled=False), torch.no_grad():
            return _AlignToBest._forward(ctx, v_hat, norm_weight, candidates, allowed, heads, scale)

    @staticmethod
    def _forward(ctx, v_hat, norm_weight, candidates, allowed, heads, scale):
        ctx.heads, ctx.scale = heads, scale
        v = _scaled(v_hat, norm_weight)
        candidates = candidates.to(v.dtype)
        shape = v.shape
        kernels = _cpu_kernels(v)
        triton_kernels = None if kernels is not None else _triton_kernels(v)
        if kernels is not None:
            ctx.path = 'cpu'
            v = v.contiguous()
            out, best, weight = kernels.align_forward(v, candidates, allowed, heads, scale)
        elif triton_kernels is not None:
            ctx.path = 'triton'
            v = _rows(v)
            out, best, weight = triton_kernels.align_forward(v, candidates, allowed, heads, scale)
        else:
            ctx.path = 'torch'
            v = _rows(v)
            out, best, weight = _align_to_best(v, candidates, allowed, heads, scale)
        ctx.save_for_backward(v_hat, norm_weight, candidates, best, weight)
        best, weight = best.view(shape[:-1] + (heads,)), weight.view(shape[:-1] + (heads,))
        ctx.mark_non_differentiable(best, weight)
        return out.view(shape), best, weight

    @staticmethod
    def backward(ctx, grad, _, __):
        v_hat, norm_weight, candidates, best, weight = ctx.saved_tensors
        v = _scaled(v_hat, norm_weight)
        candidates_grad = ctx.needs_input_grad[2]
        if ctx.path == 'cpu':
            grad_v, grad_candidates = _load_cpu_kernels().align_backward(
                grad.to(v.dtype), v.contiguous(), candidates, best, weight, ctx.heads, ctx.scale, candidates_grad)
        else:
            grad_rows, v = _rows(grad), _rows(v)
            if ctx.path == 'triton':
                grad_v, grad_candidates = _load_triton_kernels().align_backward(
                    grad_rows, v, candidates, best, weight, ctx.heads, ctx.scale, candidates_grad)
            else:
                grad_v, grad_candidates = _align_to_best_backward(
                    grad_rows.to(v.dtype), v, candidates, best, weight, ctx.heads, ctx.scale, candidates_grad)
            grad_v = grad_v.view(grad.shape)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_grad(grad_v, v_hat, norm_weight)
        if norm_weight is not None:
            grad_v = grad_v.mul_(norm_weight.to(grad_v.dtype))
        return grad_v, grad_weight, grad_candidates if candidates_grad else None, None, None, None


# what `_TimesValues` takes to make an aligned v again: v_hat, the norm weight, the candidates, the winners, the mix
# weights (`_AlignToBest`)
_Remake = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]


class _TimesValues(torch.autograd.Function):
    """attn @ v, attn (b, h, p1, p2), v (b, h, p2, d) a view of token-major values (m, T, c) (m T = b p2), keeping v
    as it is (torch.matmul would keep a copy of the heads). With `remake`, v is `_AlignToBest`'s output and remake
    what made it, as `_AlignToBest` keeps it (v_hat (m, T, c), the norm weight, the candidates, the winners and mix
    weights (m, T, h)): those are kept instead, and the backward makes v again (`_aligned_values`, a gather and a
    lerp), so that a training step keeps v_hat alone where it kept v_hat and v."""

    @staticmethod
    def forward(ctx, attn, v, *remake):
        ctx.save_for_backward(attn, *(remake or (v,)))
        out = attn @ v
        ctx.v_shape, ctx.dtype = v.shape, out.dtype  # under autocast, the dtype the product ran in
        return out

    @staticmethod
    def backward(ctx, grad):
        attn, *kept = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        grad_attn = grad_v = None
        if ctx.needs_input_grad[0]:
            if len(kept) == 1:
                v = kept[0]
            else:
                b, h, p2, d = ctx.v_shape
                v = _aligned_values(*kept).view(b, p2, h, d).transpose(1, 2)
            grad_attn = grad @ v.transpose(-2, -1).to(ctx.dtype)
        if ctx.needs_input_grad[1]:
            grad_v = attn.to(ctx.dtype).transpose(-2, -1) @ grad
        return grad_attn, grad_v, *[None] * (len(ctx.needs_input_grad) - 2)


def _aligned_values(v_hat, norm_weight, candidates, best, mix_weight):
    """v' = v + w (r* - v) again, from v_hat (m, T, c), the norm weight, the candidates (n, c) and, per token and
    head, the winner and its weight w (m, T, h), with v = v_hat * norm_weight; in float32 at least."""
    heads = best.shape[-1]
    v = _scaled(v_hat, norm_weight).unflatten(-1, (heads, -1))
    opmath = torch.promote_types(v.dtype, torch.float32)
    table, first_row = _candidate_rows(candidates.to(v.dtype), heads)
    chosen = F.embedding(best.long() + first_row, table)  # (m, T, h, d)
    mixed = (chosen.to(opmath) - v).mul_(mix_weight.unsqueeze(-1)).add_(v)
    return mixed.to(v.dtype).flatten(-2)


class _BackgroundRow(torch.autograd.Function):
    """out (b, h, p1, d) as it is (a view: what keeps out keeps no copy), with the gradient of its row bg sent to
    `row` (b, h, 1, d) instead: row bg of out and `row` hold the same numbers, made with and without a gradient
    through the attention weights."""

    @staticmethod
    def forward(ctx, out, row, bg):
        ctx.bg = bg
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        bg = ctx.bg
        grad_out = grad.clone()
        grad_out[:, :, bg] = 0
        return grad_out, grad[:, :, bg:bg + 1], None


def _times_values(attn, v, remake: _Remake | None):
    """attn @ v through `_TimesValues` (plain torch under a tracer)."""
    if not torch.jit.is_scripting():
        if not _tracing():
            return _TimesValues.apply(attn, v, *(remake or ()))
    return attn @ v


def _with_background_row(out, weights, v, bg: int):
    """out (b, h, p1, d) with its row bg made again from the background query's attention weights (b, h, 1, p2),
    taken as constants: that row's gradient reaches v alone (`_BackgroundRow`)."""
    row = weights.to(v.dtype) @ v
    if torch.jit.is_scripting():
        return torch.cat([out[:, :, :bg], row, out[:, :, bg + 1:]], 2)
    else:
        return _BackgroundRow.apply(out, row, bg)


def _logit_bias(relative_position_bias: torch.Tensor | None, mask: torch.Tensor | None):
    """Additive q.k logit bias of shape (nW or 1, h or 1, p1, p2), or None."""
    if mask is None:
        return relative_position_bias
    mask = mask.unsqueeze(1)
    return mask if relative_position_bias is None else mask + relative_position_bias


def _chunks(rows: int, tokens: int, row_bytes: int):
    """Split rows = images x tokens (image-major) into (start, stop) pieces of at most CHUNK_BYTES
    (row_bytes per row; one row at least), each either whole images or part of one image. Under a tracer one
    piece: its bounds would make every batch size a graph of its own (or fix a trace's batch size)."""
    if not torch.jit.is_scripting():
        if not _tracing():
            per_chunk = max(1, CHUNK_BYTES // row_bytes)
            if per_chunk >= tokens:
                step = per_chunk // tokens * tokens
                return [(start, min(start + step, rows)) for start in range(0, rows, step)]
            pieces = []  # a loop: TorchScript cannot parse a comprehension over two ranges
            for image in range(0, rows, tokens):
                pieces += [(image + start, image + min(start + per_chunk, tokens))
                           for start in range(0, tokens, per_chunk)]
            return pieces
    return [(0, rows)]


def _masked_scores(v, candidates, allowed, heads: int, start: int, stop: int, tokens: int):
    """v (rows, c), candidates (n, c) -> per head, v[start:stop] . candidates, (h, stop - start, n), with
    the candidates the token's image may not use (allowed (m, n) False) at -inf. One batched product
    over the heads, each head's d channels against the same head of every candidate."""
    n, c = candidates.shape
    d = c // heads
    scores = torch.bmm(v[start:stop].view(-1, heads, d).transpose(0, 1), candidates.view(n, heads, d).permute(1, 2, 0))
    first, last = start // tokens, (stop - 1) // tokens + 1
    barred = ~allowed[first:last]
    if last - first == 1:  # part of one image
        return scores.masked_fill_(barred[0], float('-inf'))
    # returned from the in-place op itself: the TorchScript-based ONNX exporter follows that, not the write through
    # the view into `scores`
    return scores.view(heads, last - first, tokens, n).masked_fill_(barred[:, None], float('-inf')).view_as(scores)


def _top_candidates(v, candidates, allowed, heads: int, k: int):
    """v (rows, c) -> (rows, h, k): per head, the indices of each token's k best allowed candidates. No
    gradient; the scores are computed chunk by chunk (`_chunks`) and none is kept."""
    rows, n = v.shape[0], candidates.shape[0]
    tokens = rows // allowed.shape[0]
    best = torch.empty(rows, heads, k, dtype=torch.long, device=v.device)
    with torch.no_grad():
        for start, stop in _chunks(rows, tokens, (heads * n + k * heads) * v.element_size()):
            scores = _masked_scores(v, candidates, allowed, heads, start, stop, tokens)
            best[start:stop] = scores.topk(k, -1).indices.transpose(0, 1)
    return best


def _candidate_rows(candidates, heads: int):
    """candidates (n, c) -> table (h*n, d), head-major: row i*n + j is head i of candidate j; and first_row (h,),
    each head's first row, so that winners (..., h) + first_row are the winners' rows of the table."""
    n, c = candidates.shape
    table = candidates.view(n, heads, c // heads).transpose(0, 1).reshape(heads * n, c // heads)
    return table, torch.arange(heads, device=candidates.device) * n


def _align_to_best(v, candidates, allowed, heads, scale):
    """The torch code of `_AlignToBest`'s forward: v (rows, c) -> out (rows, c), best (rows, h) int64 and
    weight (rows, h) in float32 at least. Per chunk of tokens: the per-head scores, the best allowed
    candidate, its weight, and the mix with the winner gathered by index."""
    rows, c = v.shape
    n, d = candidates.shape[0], c // heads
    tokens = rows // allowed.shape[0]
    opmath = torch.promote_types(v.dtype, torch.float32)
    half = v.element_size() < 4  # half precision: the winner's score again, and the mix, in float32
    table, first_row = _candidate_rows(candidates, heads)
    out = torch.empty(rows, c, dtype=v.dtype, device=v.device)
    best = torch.empty(rows, heads, dtype=torch.long, device=v.device)
    weight = torch.empty(rows, heads, dtype=opmath, device=v.device)
    for start, stop in _chunks(rows, tokens, (heads * n + c * (5 if half else 1)) * v.element_size()):
        top, pick = _masked_scores(v, candidates, allowed, heads, start, stop, tokens).max(-1)  # (h, rows)
        best[start:stop] = pick.t()
        v_heads = v[start:stop].view(-1, heads, d)
        chosen = F.embedding(best[start:stop] + first_row, table)  # (rows, h, d)
        top = torch.linalg.vecdot(v_heads.to(opmath), chosen.to(opmath)) if half else top.t()
        self_score = torch.linalg.vector_norm(v_heads, dim=-1, dtype=opmath).square_()
        w = weight[start:stop]
        torch.sigmoid((top - self_score).mul_(scale), out=w)
        mixed = out[start:stop].view(-1, heads, d)
        if half:
            mixed.copy_(torch.lerp(v_heads.to(opmath), chosen.to(opmath), w.unsqueeze(-1)))
        else:
            torch.lerp(v_heads, chosen, w.unsqueeze(-1), out=mixed)
    return out, best, weight


def _align_to_best_backward(grad, v, candidates, best, weight, heads, scale, candidates_grad):
    """The torch code of `_AlignToBest`'s backward, from the winners' indices and weights only, in chunks of
    tokens. With z = v.r* - v.v and dz = dL/dz = g.(r* - v) scale w (1 - w): grad_v = (1 - w) g + dz
    (r* - 2 v); grad_r* = w g + dz v, summed (in float32 at least) per head over the tokens that chose r*."""
    rows, c = v.shape
    n, d = candidates.shape[0], c // heads
    opmath = weight.dtype
    table, first_row = _candidate_rows(candidates, heads)
    grad_v = torch.empty(rows, c, dtype=v.dtype, device=v.device)
    grad_rows = torch.zeros(heads * n, d, dtype=opmath, device=v.device) if candidates_grad else None
    for start, stop in _chunks(rows, 1, 4 * c * max(v.element_size(), 4)):
        g, v_heads = grad[start:stop].view(-1, heads, d), v[start:stop].view(-1, heads, d)
        w = weight[start:stop]
        index = best[start:stop] + first_row  # rows of `table`
        diff = F.embedding(index, table).sub_(v_heads)  # r* - v
        dz = torch.linalg.vecdot(g, diff).to(opmath).mul_(w * (1 - w) * scale)  # (chunk, h)
        dz_v = dz.to(v.dtype).unsqueeze(-1)
        part = torch.mul(g, (1 - w).to(v.dtype).unsqueeze(-1), out=grad_v[start:stop].view(-1, heads, d))
        part.addcmul_(diff, dz_v).addcmul_(v_heads, dz_v, value=-1)
        if candidates_grad:  # diff's memory is reused when the dtypes allow
            contribution = torch.mul(g, w.unsqueeze(-1), out=diff) if opmath == v.dtype else \
                g.to(opmath) * w.unsqueeze(-1)
            contribution.addcmul_(v_heads, dz.unsqueeze(-1))
            grad_rows.index_add_(0, index.view(-1), contribution.view(-1, d))
    grad_candidates = None
    if candidates_grad:
        grad_candidates = grad_rows.view(heads, n, d).transpose(0, 1).reshape(n, c).to(candidates.dtype)
    return grad_v, grad_candidates


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters, eps and results) with a faster hand-written backward that keeps the
    output, not the input. ISTA2 calls its two halves apart (`ISTA2._normalize_qk`, `ISTA2._normalize_v`)."""

    def forward(self, x):
        if torch.jit.is_scripting():
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        else:
            return _weighted(_RMSNormFunction.apply(x, self.eps), self.weight)


@register_notrace_module  # one leaf in torch.fx graphs made through timm (feature extraction, its fx tests)
class ISTA2(nn.Module):
    """Attention over pre-projected q/k/v, with optional inter-sample alignment of v.

    Keyword-compatible with the reference implementation. ``qk_scale`` multiplies the
    q.k logits and ``v_scale`` the alignment scores; the backbones pass their attention
    scale for both. ``attn_drop_layer`` (e.g. the block's ``nn.Dropout``) is applied to
    the self-attention weights only. ``options``: the keywords of
    ``common.ista2_options.OPTIONS`` (qk_norm, ista2_method, rep_tkn_type, ...), checked
    there and each kept as an attribute of the same name.
    """
    # for TorchScript, attributes that hold None at first
    random_tkn_idxs: torch.Tensor | None
    winners: torch.Tensor | None

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
        # set keep_winners to find in `winners` the candidates of the last alignment: (m, T, h, k) indices into its
        # candidates, per token and head (batch: image * J + j over the pool's J representatives per image; bank: row)
        self.keep_winners, self.winners = False, None

        norm = RMSNorm if self.norm_type == 'rmsnorm' else nn.LayerNorm
        self.q_norm_layer = norm(dim) if self.qk_norm else nn.Identity()
        self.k_norm_layer = norm(dim) if self.qk_norm else nn.Identity()
        self.v_norm_layer = norm(dim) if self.v_norm else nn.Identity()
        # eval_align='bank': a FIFO queue of the latest training representatives (every rank's, in rank
        # order, so that all ranks hold the same), `bank_count` the rows queued so far; both saved in the
        # state_dict, neither a parameter. Other models' state_dicts stay as they were.
        self.collecting_bank = False  # set by `rebuild_banks`: align against the batch and fill the bank
        self._warned_empty_bank = False
        if self.eval_align == 'bank':
            self.register_buffer('bank', torch.zeros(self.bank_size, dim))
            self.register_buffer('bank_count', torch.zeros((), dtype=torch.long))

    def __prepare_scriptable__(self):
        """torch.jit.script calls this before it compiles the module: what a TorchScript module cannot do is said
        here. It runs the torch code path, and aligns within the batch it is given (no process group)."""
        if self.across_gpus:
            warnings.warn('ISTA2: across_gpus=True has no effect in a TorchScript module: it aligns each image '
                          'with the other images of its own batch only', stacklevel=2)
        return self

    def extra_repr(self):
        bank = f', bank_size={self.bank_size}' if self.eval_align == 'bank' else ''
        return (f'dim={self.dim}, num_heads={self.num_heads}, ista2_method={self.ista2_method!r}, '
                f'attn_inter_topk={self.attn_inter_topk}, rep_tkn_type={self.rep_tkn_type!r}, '
                f'eval_align={self.eval_align!r}{bank}')

    def _alignment(self):
        """What v is aligned against in this call: 'batch', 'bank' or 'off' (training: always 'batch')."""
        if self.ista2_method is None:
            return 'off'
        return 'batch' if self.training or self.collecting_bank else self.eval_align

    def forward(self, q, k, v, real_b: int | None = None, relative_position_bias: torch.Tensor | None = None,
                mask: torch.Tensor | None = None):
        """q (b, p1, c), k/v (b, p2, c) -> (b, p1, c).

        real_b: images in the batch when each image spans b/real_b rows (Swin windows);
        with ``is_swin`` it defaults to b / mask.shape[0]. relative_position_bias
        (h, p1, p2) and mask (nW, p1, p2) are added to the q.k logits.
        """
        b, p1, c = q.shape
        p2, h = k.shape[1], self.num_heads
        if mask is not None and b % mask.shape[0]:
            raise ValueError(f'ISTA2: batch of {b} rows is not a multiple of the {mask.shape[0]} windows in mask')
        q, k, k_weight = self._normalize_qk(q, k)
        v, v_weight = self._normalize_v(v)
        alignment = self._alignment()
        remake = None
        if alignment == 'off':
            v = _weighted(v, v_weight)
        else:
            v = v.reshape(self._images_in_batch(b, real_b, mask), -1, c)
            if alignment == 'batch':
                v, remake = self._align(v, v_weight)
            elif hasattr(self, 'bank'):  # 'bank' (TorchScript compiles the call for a layer with a bank alone)
                v, remake = self._align_to_bank(v, v_weight)
            else:
                raise ValueError("ISTA2: eval_align='bank' needs a layer built with it (it has no bank); build "
                                 "the layer with eval_align='bank'")
            v = v.view(b, p2, c)
        q = q.view(b, p1, h, -1).transpose(1, 2)  # (b, h, p1, d)
        k = k.view(b, p2, h, -1).transpose(1, 2)
        v = v.view(b, p2, h, -1).transpose(1, 2)
        if k_weight is not None:
            k_weight = k_weight.view(h, 1, -1)  # per channel of each head
        out = self._attend(q, k, k_weight, v, remake, _logit_bias(relative_position_bias, mask))  # (b, h, p1, d)
        if not torch.jit.is_scripting():
            out = _ContiguousGrad.apply(out)
        return out.transpose(1, 2).reshape(b, p1, c)

    def _normalize_qk(self, q, k):
        """q and k through their norms -> q_n, k_n, weight: the logits are q_n . (k_n * weight), per channel
        (weight None: q_n . k_n). With RMSNorm, q's weight moves onto k, (q / rms(q) * w_q) . (k / rms(k) * w_k)
        = (q / rms(q)) . (k / rms(k) * w_q * w_k), and the product of the weights is left to the attention
        (`_attend`), so that each norm's output is what the attention keeps for backward (no second copy)."""
        cls, bg = self.cls_tkn_idx, self.bg_tkn_idx  # bg: set with rep_tkn_type='cls+bg' alone
        if not torch.jit.is_scripting():
            if isinstance(self.q_norm_layer, RMSNorm):
                background = None if bg is None else (cls, bg)
                return (_RMSNormFunction.apply(q, self.q_norm_layer.eps, background),
                        _RMSNormFunction.apply(k, self.k_norm_layer.eps),
                        self.k_norm_layer.weight * self.q_norm_layer.weight)
        q = self.q_norm_layer(q)
        if cls is not None and bg is not None:  # the background query as `_RMSNormFunction` makes it, in a copy of q
            q = torch.cat([q[:, :bg], -q[:, cls:cls + 1].detach(), q[:, bg + 1:]], 1)
        return q, self.k_norm_layer(k), None

    def _normalize_v(self, v):
        """v through its norm -> v_n, weight: the normalised v is v_n * weight (weight None: v_n). With RMSNorm
        the weight is applied by the alignment, which then keeps the norm's output for backward, not a copy."""
        if not torch.jit.is_scripting():
            if isinstance(self.v_norm_layer, RMSNorm):
                return _RMSNormFunction.apply(v, self.v_norm_layer.eps), self.v_norm_layer.weight
        return self.v_norm_layer(v), None

    def _images_in_batch(self, b: int, real_b: int | None, mask: torch.Tensor | None) -> int:
        if real_b is not None:
            images = real_b
        elif not self.is_swin:
            return b
        elif mask is None:
            raise ValueError('ISTA2(is_swin=True) needs real_b (images in the batch) when no shift mask '
                             'gives the number of windows')
        else:
            images = b // mask.shape[0]
        if images <= 0 or b % images:
            raise ValueError(f'ISTA2: real_b={images} must be a positive divisor of the batch rows b={b}')
        return images

    def _attend(self, q, k, k_weight: torch.Tensor | None, v, remake: _Remake | None,
                bias: torch.Tensor | None):
        """softmax(q.(k * k_weight) * qk_scale + bias) @ v: q (b, h, p1, d), k/v (b, h, p2, d), k_weight (h, 1, d) or
        None -> (b, h, p1, d). The bias's leading dim cycles over the rows of each image (Swin windows). remake:
        how the alignment makes v again (`_align`), so that the explicit path need not keep v (`_TimesValues`),
        or None."""
        p = 0.  # (not through a local variable: TorchScript reads a submodule's constants from self alone)
        if self.attn_drop_layer is not None:
            if self.attn_drop_layer.training:
                p = self.attn_drop_layer.p
        background = self.bg_tkn_idx  # set with rep_tkn_type='cls+bg' alone
        # fused kernel; with a bias that needs a gradient it would be no faster than the explicit path. Not in an
        # ONNX export: the TorchScript-based exporter's scaled_dot_product_attention fails on an explicit scale
        # (torch 2.4 to 2.14: "z_(): incompatible function arguments"), and either exporter writes out the same
        # products and softmax as the explicit path. Not for a background query under dropout, whose dropped
        # weights the kernel does not tell, and not for a dropout layer of another kind
        fused = bias is None and not _exporting_onnx() and not (background is not None and p > 0)
        if self.attn_drop_layer is not None:
            if torch.jit.is_scripting():
                fused = fused and p == 0.  # (TorchScript cannot tell an nn.Dropout from another module)
            else:
                fused = fused and type(self.attn_drop_layer) is nn.Dropout
        if fused:
            out = F.scaled_dot_product_attention(q, _weighted(k, k_weight), v, dropout_p=p, scale=self.qk_scale)
            if background is not None:
                with torch.no_grad():
                    weights = _logits(q[:, :, background:background + 1], k, k_weight, self.qk_scale).softmax(-1)
                out = _with_background_row(out, weights, v, background)
        else:
            attn = self._weights(_logits(q, k, k_weight, self.qk_scale), bias)
            out = _times_values(attn, v, remake)
            if background is not None:
                out = _with_background_row(out, attn[:, :, background:background + 1].detach(), v, background)
        return out

    def _weights(self, logits, bias: torch.Tensor | None):
        """The attention weights of logits (b, h, p1, p2) with the bias added (its leading dim cycling over the
        rows of each image), through softmax and the attention dropout."""
        if bias is not None:
            windows = bias.shape[0] if bias.dim() == 4 else 1
            logits = (logits.unflatten(0, (-1, windows)) + bias).flatten(0, 1)
        attn = logits.softmax(-1)
        return attn if self.attn_drop_layer is None else self.attn_drop_layer(attn)

    def _representatives(self, v):
        """v (m, T, c), the T tokens of each of m images -> their representatives (m, J, c). The kind of token
        (rep_tkn_type) is told by the options it sets, which TorchScript can see are None for the other kinds."""
        cls, bg, ratio = self.cls_tkn_idx, self.bg_tkn_idx, self.rep_tkn_ratio
        if cls is not None:  # 'cls', 'cls+bg'
            if bg is None:
                return v[:, [cls]]
            return v[:, [cls, bg]]
        if ratio is not None:  # 'random'
            count = v.shape[1]
            if self.training:
                order = torch.randperm(count, device=v.device)
            else:  # fixed at eval so that evaluation is deterministic
                order = torch.randperm(count, generator=torch.Generator().manual_seed(count)).to(v.device)
            self.random_tkn_idxs = order[:math.ceil(count * ratio)].sort().values
            return v[:, self.random_tkn_idxs]
        if self.rep_tkn_type is not None:  # 'mean'
            return v.mean(1, keepdim=True)
        return v  # None: every token

    def _align(self, v, weight: torch.Tensor | None = None):
        """v (m, T, c): T tokens of each of m images, to be scaled by the v norm's weight (c,) or None -> v' =
        w_self * v + sum_top-k w_r * r, same shape, v meaning the scaled one; and how to make v' again without
        keeping it (`_TimesValues`'s inputs after v'), or None.

        Candidates r are the representatives of the other images in the pool (the local
        batch, or every rank's batch with across_gpus); w = softmax over the scaled dot
        products [v.v, v.r for the k best r], per head.
        """
        m, tokens, c = v.shape
        reps = _weighted(self._representatives(v), weight)
        offset, gathered = 0, False
        if not torch.jit.is_scripting():  # (a TorchScript module aligns within its own batch: `__prepare_scriptable__`)
            if self.across_gpus and _distributed():
                offset = dist.get_rank() * m
                reps, gathered = gather_from_ranks(reps), True
        if hasattr(self, 'bank'):  # (TorchScript compiles the call for a layer with a bank alone)
            if self.eval_align == 'bank':
                self._update_bank(reps, gathered)
        n, reps_per_image = reps.shape[0], reps.shape[1]
        others, ratio = n - 1, self.bs_ratio
        if ratio is not None:
            others = math.ceil(others * ratio)
        if others == 0:
            return _weighted(v, weight), None
        # not min(): under torch 2.4's compile, min(1, batch - 1) pins the batch size to 2 when it is 2
        pooled = others * reps_per_image
        topk = self.attn_inter_topk if pooled >= self.attn_inter_topk else pooled
        # Image g may use the first `others` images of the pool other than itself: all of them lie
        # among the first others+1, and of those exactly one is barred, image min(g, others).
        candidates = reps[:others + 1].flatten(0, 1)  # ((others+1)*J, c)
        barred = (torch.arange(m, device=v.device) + offset).clamp(max=others)
        allowed = torch.ones(m, others + 1, reps_per_image, dtype=torch.bool, device=v.device)
        allowed[torch.arange(m, device=v.device), barred] = False
        allowed = allowed.flatten(1)  # (m, (others+1)*J)
        return self._mix(v, weight, candidates, allowed, topk)

    def _update_bank(self, reps, gathered: bool):
        """Append the representatives (m, J, c) of this batch (of every rank's, in rank order, when a process
        group exists) to the bank, dropping the oldest rows; no gradient, no host synchronisation."""
        rows = reps.detach().flatten(0, 1)
        if not torch.jit.is_scripting():
            if not gathered and _distributed():
                rows = gather_from_ranks(rows)
        total = rows.shape[0]
        rows = rows[-self.bank_size:]  # the rows a queue of bank_size would keep of these
        with torch.no_grad():
            start = self.bank_count + (total - rows.shape[0])
            index = (start + torch.arange(rows.shape[0], device=rows.device)) % self.bank_size
            self.bank.index_copy_(0, index, rows.to(self.bank.dtype))
            self.bank_count.add_(total)  # representative rows queued so far

    def _align_to_bank(self, v, weight: torch.Tensor | None = None):
        """v (m, T, c) and the v norm's weight aligned as in `_align` (the same two results), with every image's
        candidates the bank's rows: no image sees another, so each output is that of the image alone. An empty bank
        aligns nothing (with a warning). Under a tracer, which cannot read the count (torch.compile without a graph
        break, an export at all): the whole bank with its unfilled rows barred, the same when it holds top-k rows or
        more (a trained or rebuilt bank is full), asserted on the device."""
        if _tracing():
            topk = min(self.attn_inter_topk, self.bank_size)
            torch._assert_async(self.bank_count >= topk, 'ISTA2: fewer rows in the bank than attn_inter_topk')
            allowed = (torch.arange(self.bank_size, device=v.device) < self.bank_count).expand(v.shape[0], -1)
            return self._mix(v, weight, self.bank.to(v.dtype), allowed, topk)
        filled = min(int(self.bank_count), self.bank_size)
        if filled == 0:
            if not self._warned_empty_bank:
                warnings.warn('ISTA2: the representative bank is empty (a checkpoint without one?), so this layer '
                              "evaluates without alignment; rebuild it with the trainer's bank command "
                              '(docs/method.md)', stacklevel=2)
                self._warned_empty_bank = True
            return _weighted(v, weight), None
        candidates = self.bank[:filled].to(v.dtype)
        allowed = torch.ones(v.shape[0], filled, dtype=torch.bool, device=v.device)
        return self._mix(v, weight, candidates, allowed, min(self.attn_inter_topk, filled))

    def _mix(self, v, weight: torch.Tensor | None, candidates, allowed, topk: int):
        """v (m, T, c) to be scaled by weight (c,) or None, candidates (n, c), allowed (m, n) -> v' (m, T, c): per
        head, each (scaled) token mixed with its `topk` best allowed candidates by the softmax of the scaled
        scores, itself included; and for top-1, what makes v' again (`_TimesValues`), else None."""
        m, tokens, c = v.shape
        h, d = self.num_heads, c // self.num_heads
        if not torch.jit.is_scripting():
            if topk == 1 and not _exporting_onnx():
                # (an ONNX export and TorchScript run the code below with k = 1, the same softmax of [s v.v, s v.r*]:
                # the TorchScript-based exporter loses _AlignToBest's writes into its preallocated outputs)
                out, best, mix_weight = _AlignToBest.apply(v, weight, candidates, allowed, h, self.v_scale)
                if self.keep_winners:
                    self.winners = best.long().unsqueeze(-1)
                return out, (v, weight, candidates, best, mix_weight)
        v = _weighted(v, weight)

        # which candidates win carries no gradient; their scores do, below
        best = _top_candidates(_rows(v.detach()), candidates.detach(), allowed, h, topk).view(m, tokens, h, topk)
        if self.keep_winners:
            self.winners = best
        v_heads, candidates = v.view(m, tokens, h, d), candidates.view(-1, h, d)
        head_start = torch.arange(h, device=v.device).view(h, 1) * candidates.shape[0]
        chosen = F.embedding(best + head_start, candidates.transpose(0, 1).flatten(0, 1))  # (m, T, h, k, d)
        # in an ONNX export products summed: the TorchScript-based exporter lacks torch.linalg.vecdot (which keeps
        # no (m, T, h, k, d) product)
        scores = (v_heads.unsqueeze(-2) * chosen).sum(-1) if _exporting_onnx() else \
            torch.linalg.vecdot(v_heads.unsqueeze(-2), chosen)
        logits = torch.cat([v_heads.square().sum(-1, keepdim=True), scores], -1) * self.v_scale
        # softmax in fp32 at least, also under autocast
        weights = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
        mixed = torch.addcmul((weights[..., 1:, None] * chosen).sum(-2), weights[..., :1], v_heads)
        return mixed.view(m, tokens, c), None


def bank_layers(model):
    """The ISTA2 layers of `model` that evaluate against a bank (eval_align='bank')."""
    return [m for m in model.modules() if isinstance(m, ISTA2) and m.eval_align == 'bank']


def rebuild_banks(model, batches):
    """Refill the representative bank of every ISTA2 layer of `model` with eval_align='bank' (e.g. after loading
    a checkpoint without banks): the bank is emptied, then the batches of `batches` (input tensors, or
    tuples/lists whose first item is one: a DataLoader of training images) run through the model frozen (eval
    mode, no gradient: no dropout, no change to batch-norm statistics), every ISTA2 layer aligning against the
    batch as in training and queueing its representatives, until every bank is full. Run it on every rank when
    distributed, with equal batches (each call exchanges the representatives). Returns the images used."""
    banks = bank_layers(model)
    if not banks:
        raise ValueError("rebuild_banks: the model has no ISTA2 layer with eval_align='bank'")
    was_training, images = model.training, 0
    model.eval()
    for m in banks:
        m.bank.zero_()
        m.bank_count.zero_()
        m.collecting_bank = True
    try:
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, tuple | list) else batch
                model(x.to(banks[0].bank.device))
                images += x.shape[0]
                if all(int(m.bank_count) >= m.bank_size for m in banks):  # equal on every rank: all stop together
                    break
    finally:
        for m in banks:
            m.collecting_bank = False
        model.train(was_training)
    return images
