"""ISTA2's Triton kernels (common/ista2_triton.py) against the float64 oracle of common/ista2_oracle.py.

The kernels run on CUDA tensors. Without a GPU, the test below runs this file again in a subprocess under
Triton's interpreter (TRITON_INTERPRET=1 must be set before the kernels are defined, and the interpreter
patches triton.language for the whole process, so it gets a process of its own), on CPU tensors:

    TRITON_INTERPRET=1 python -m pytest tests/test_ista2_triton.py    # the cases themselves, one by one

Every kernel, forward and backward, in float32, float16 and bfloat16. Under the interpreter a bfloat16
tile is widened to float32 before tl.dot (see INTERPRETED in the module), so the native bfloat16 product
of the alignment's scores is exercised on a GPU only: with one, this process also runs every case on CUDA
tensors with the compiled kernels (and the whole-call cases on the torch path there too). The torch code
path and the fused CPU kernels face the same kernel-level checks in this process, on the CPU. The self-check
that precedes the kernels' first use per (device type, dtype) is tested with the real kernels and with kernels
made to raise or to return wrong values.
"""
import copy
import importlib.util
import inspect
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from common import ista2
from common.ista2_oracle import naive_ista2, rms_norm
from tests.test_ista2 import ALIGN, REPS, make, qkv

INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'
# triton 3.0's interpreter, under numpy 1.26
pytestmark = pytest.mark.filterwarnings('ignore:Conversion of an array with ndim > 0:DeprecationWarning')
if INTERPRETED:
    from triton.runtime import interpreter

    if 'scope' in inspect.signature(interpreter._patch_lang_tensor).parameters and \
            'int(self.handle.data))' in inspect.getsource(interpreter._patch_lang_tensor):
        # Triton 3.6's interpreter (torch 2.11's) holds a scalar argument as a 1-element array, and its __index__
        # (a loop bound: range(0, n, BLOCK_N)) is int() of that array, an error since numpy 2.4 ('only
        # 0-dimensional arrays can be converted'); Triton 3.8 squeezes the array first. The same fix, in this
        # test process only: compiled kernels never take this path.
        def _patch_lang_tensor(tensor, scope, patch=interpreter._patch_lang_tensor):
            patch(tensor, scope)
            scope.set_attr(tensor, '__index__', lambda self: int(self.handle.data.squeeze()))

        interpreter._patch_lang_tensor = _patch_lang_tensor
ROOT = Path(__file__).resolve().parents[1]
# Largest error allowed, relative to the largest magnitude of the float64 result: output rounding to the
# dtype (half an ulp: 2^-8 for bfloat16, 2^-11 for float16) plus float32 sums, with some margin.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # those the Triton kernels serve
CUDA = torch.cuda.is_available() and not INTERPRETED
DEVICE = 'cuda' if CUDA else 'cpu'
PATHS = ['triton', 'torch'] if CUDA else ['triton']


def assert_close(actual, expected, dtype, name='', precision=None):
    """actual (of dtype) against a float64 result, relative to the result's largest magnitude, within the
    tolerance of `precision` (default: dtype)."""
    assert actual.dtype == dtype, (name, actual.dtype)
    error = (actual.double().cpu() - expected.cpu()).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= TOLERANCE[precision or dtype] * max(scale, 1e-3), (name, error, scale)


def reference_alignment(v, candidates, heads, scale, best):
    """Float64, from the formulas: per token and head, with r* the winner `best` (m, T, h),
    (w_self, w_r*) = softmax(s v.v, s v.r*) and v' = w_self v + w_r* r*. Differentiable."""
    m, tokens, c = v.shape
    d = c // heads
    v_heads, rows = v.view(m, tokens, heads, d), candidates.view(-1, heads, d)
    chosen = rows[best, torch.arange(heads)]  # (m, T, h, d)
    weights = torch.softmax(torch.stack([(v_heads * v_heads).sum(-1), (v_heads * chosen).sum(-1)]) * scale, 0)
    return (weights[0, ..., None] * v_heads + weights[1, ..., None] * chosen).reshape(m, tokens, c)


ALIGNMENT_SHAPES = [  # m images, tokens, heads, d, n candidates, (BLOCK_T, BLOCK_N) for the Triton kernels
    (3, 7, 3, 5, 11, None),  # one block of everything, d padded to 16
    (2, 70, 3, 32, 70, None),  # 140 tokens: 3 blocks of 64; 70 candidates: 2 blocks of 64
    (4, 9, 2, 16, 37, (16, 16)),  # small blocks: token blocks span images; 3 candidate blocks
    (2, 20, 1, 64, 5, (32, 16)),  # one head
]


def check_alignment(dtype, m, tokens, heads, d, n, winner_tolerance=1e-5, device='cpu'):
    """`_AlignToBest`, forward and backward, against the float64 formulas with the winners it chose, each of
    which must be the best allowed candidate in float64 too (to winner_tolerance x the largest score).
    Returns the winners."""
    torch.manual_seed(m * tokens + n)
    c = heads * d
    v, candidates, grad = torch.randn(m, tokens, c).to(dtype), torch.randn(n, c).to(dtype), \
        torch.randn(m, tokens, c).to(dtype)
    allowed = torch.rand(m, n) < 0.6
    allowed[torch.arange(m), torch.randint(0, n, (m,))] = True  # at least one candidate per image
    scale = 0.3
    inputs = v.to(device).requires_grad_(), candidates.to(device).requires_grad_()
    out, best, _ = ista2._AlignToBest.apply(inputs[0], None, inputs[1], allowed.to(device), heads, scale)
    best = best.long().cpu()
    grad_v, grad_candidates = torch.autograd.grad(out, inputs, grad.to(device))

    v64, c64 = v.double().requires_grad_(), candidates.double().requires_grad_()
    scores = torch.einsum('mthd,nhd->mthn', v64.view(m, tokens, heads, d), c64.view(n, heads, d)).detach()
    scores = scores.masked_fill(~allowed[:, None, None], float('-inf'))
    top = scores.max(-1).values
    assert (top - scores.gather(-1, best[..., None]).squeeze(-1)).max() <= winner_tolerance * top.abs().max()
    expected = reference_alignment(v64, c64, heads, scale, best)
    theirs = torch.autograd.grad(expected, (v64, c64), grad.double())
    assert_close(out, expected, dtype, 'out')
    assert_close(grad_v, theirs[0], dtype, 'grad_v')
    assert_close(grad_candidates, theirs[1], dtype, 'grad_candidates')
    return best


needs_triton = pytest.mark.skipif(importlib.util.find_spec('triton') is None,
                                  reason='Triton is not installed (it ships with the CUDA torch wheels)')


if not INTERPRETED:
    @needs_triton
    def test_kernels_under_the_triton_interpreter():
        env = {**os.environ, 'TRITON_INTERPRET': '1', 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
        cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-6000:]
        assert ' passed' in output and 'skipped' not in output, output[-3000:]
        print(output.strip().splitlines()[-1], f'({time.perf_counter() - start:.1f} s with the start-up)')

    @needs_triton
    def test_triton_serves_what_it_should(monkeypatch):
        monkeypatch.setattr(ista2, 'TRITON_DEVICES', ('cuda', 'cpu'))
        monkeypatch.setattr(ista2, 'TRITON_PROBES', {})
        monkeypatch.setattr(ista2, '_triton_probe', lambda device, dtype: None)  # which tensors, not the kernels
        assert ista2._triton_kernels(torch.zeros(1, dtype=torch.float64)) is None
        assert ista2._triton_kernels(torch.zeros(1, dtype=torch.int32)) is None
        for dtype in DTYPES:
            assert ista2._triton_kernels(torch.zeros(1, dtype=dtype)) is not None
        monkeypatch.setattr(ista2, 'TRITON', False)
        assert ista2._triton_kernels(torch.zeros(1)) is None
        monkeypatch.setattr(ista2, 'TRITON', True)
        monkeypatch.setattr(ista2, 'TRITON_DEVICES', ('cuda',))
        assert ista2._triton_kernels(torch.zeros(1)) is None  # CPU tensors go to the fused kernels or torch

    def kernel_builds(dtype):
        """(kernel, argument types, constexprs) for every kernel and specialisation the wrappers launch."""
        from common import ista2_triton as k
        x, i = {torch.float32: '*fp32', torch.float16: '*fp16', torch.bfloat16: '*bf16'}[dtype], 'i32'
        f32 = '*fp32'
        align = dict(BLOCK_T=64, BLOCK_N=64, BLOCK_D=32)
        return [
            (k._rms_norm_forward_kernel, dict(x_ptr=x, y_ptr=x, inv_ptr=f32, rows=i, c=i, x_stride=i, eps='fp32'),
             dict(BLOCK_R=32, BLOCK_C=128)),
            (k._rms_norm_backward_kernel, dict(g_ptr=x, y_ptr=x, inv_ptr=f32, gx_ptr=x, rows=i, c=i, g_stride=i,
                                               y_stride=i), dict(BLOCK_R=32, BLOCK_C=128)),
            (k._align_forward_kernel, dict(v_ptr=x, cand_ptr=x, allowed_ptr='*u8', out_ptr=x, best_ptr='*i32',
                                           weight_ptr=f32, rows=i, tokens=i, n=i, c=i, d=i, heads=i, v_stride=i,
                                           scale='fp32'), dict(DOT_FP32=dtype == torch.float32, **align)),
            (k._align_backward_tokens_kernel, dict(g_ptr=x, v_ptr=x, cand_ptr=x, best_ptr='*i32', weight_ptr=f32,
                                                   gv_ptr=x, dz_ptr=f32, rows=i, c=i, d=i, heads=i, g_stride=i,
                                                   v_stride=i, scale='fp32'), dict(BLOCK_T=64, BLOCK_D=32)),
            (k._align_backward_candidates_kernel, dict(g_ptr=x, v_ptr=x, best_ptr='*i32', weight_ptr=f32, dz_ptr=f32,
                                                       partial_ptr=f32, rows=i, n=i, c=i, d=i, heads=i, g_stride=i,
                                                       v_stride=i, tiles_per_split=i), align),
        ]

    @needs_triton
    @pytest.mark.parametrize('dtype', DTYPES)
    def test_kernels_compile_for_cuda(dtype):
        """Every kernel through Triton's CUDA compiler (to PTX and, with the bundled ptxas, a cubin for sm_80),
        which needs no GPU: what the interpreter does not check (types, layouts, tl.dot lowering)."""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        for kernel, types, constants in kernel_builds(dtype):
            names = [p.name for p in kernel.params if not p.is_constexpr]
            assert sorted(names) == sorted(types), kernel.__name__
            compiled = triton.compile(ASTSource(kernel, {n: types[n] for n in names}, constants),
                                      target=GPUTarget('cuda', 80, 32))
            assert compiled.asm['cubin'], kernel.__name__
            if kernel.__name__ == '_align_forward_kernel' and dtype != torch.float32:
                assert 'mma' in compiled.asm['ptx']  # half-precision scores on the tensor cores

    @pytest.mark.parametrize('dtype', DTYPES + [torch.float64])
    @pytest.mark.parametrize('shape', ALIGNMENT_SHAPES)
    def test_the_torch_path_alignment(monkeypatch, dtype, shape):
        """The torch code path (CUDA without Triton; CPU tensors the fused kernels do not serve) at the same
        checks. In half precision it ranks the candidates on half-precision scores, so its winner need only
        be the best to that precision; its weight is computed from the winner's score summed in float32."""
        monkeypatch.setattr(ista2, 'TRITON', False)
        monkeypatch.setattr(ista2, 'CPU_KERNELS', False)
        exact = dtype in (torch.float32, torch.float64)
        check_alignment(dtype, *shape[:5], winner_tolerance=1e-5 if exact else 2 * TOLERANCE[dtype])

    @pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
    @pytest.mark.parametrize('shape', ALIGNMENT_SHAPES)
    def test_the_fused_and_the_torch_path_pick_the_same_winners(monkeypatch, dtype, shape):
        assert ista2._load_cpu_kernels() is not None
        winners = []
        for fused in (True, False):
            monkeypatch.setattr(ista2, 'CPU_KERNELS', fused)
            winners.append(check_alignment(dtype, *shape[:5]))
        assert torch.equal(*winners)


if INTERPRETED or CUDA:
    from common import ista2_triton

    @pytest.fixture
    def triton_on(monkeypatch):
        """ISTA2 sends CPU tensors to the (interpreted) Triton kernels too."""
        monkeypatch.setattr(ista2, 'TRITON', True)
        monkeypatch.setattr(ista2, 'TRITON_DEVICES', ('cuda', 'cpu') if INTERPRETED else ('cuda',))
        monkeypatch.setattr(ista2, 'CPU_KERNELS', False)  # they would take float32 CPU tensors first

    def count_kernel_calls(monkeypatch):
        """Counts the calls of each kernel wrapper from now on: {name: calls}."""
        calls = {}

        def counted(name, fn):
            def call(*args, **kwargs):
                calls[name] = calls.get(name, 0) + 1
                return fn(*args, **kwargs)
            return call

        for name in ('rms_norm_forward', 'rms_norm_backward', 'align_forward', 'align_backward'):
            monkeypatch.setattr(ista2_triton, name, counted(name, getattr(ista2_triton, name)))
        return calls

    @pytest.fixture
    def kernel_calls(triton_on, monkeypatch):
        """Counts the kernels' calls after their self-checks (run once per process and dtype, not counted)."""
        assert all(ista2.triton_in_use(DEVICE, dtype) for dtype in DTYPES)
        return count_kernel_calls(monkeypatch)

    @pytest.mark.parametrize('dtype', DTYPES)
    @pytest.mark.parametrize('with_weight', [False, True])
    @pytest.mark.parametrize('rows, c', [(37, 96), (5, 7), (130, 40)])
    def test_rms_norm(kernel_calls, dtype, with_weight, rows, c):
        """Forward and backward on rows that are a strided slice of a wider tensor (q/k/v from one Linear),
        widths and row counts that are not multiples of the blocks, float32 weights (as under autocast) applied
        after the kernel, as ISTA2 applies them."""
        torch.manual_seed(rows + c)
        wide = torch.randn(rows, 3, c).to(dtype)
        weight = (torch.rand(c) + 0.5) if with_weight else None
        grad = torch.randn(rows, c).to(dtype)
        x = wide.to(DEVICE)[:, 1].requires_grad_()  # row stride 3c
        w = weight.to(DEVICE).requires_grad_() if with_weight else None
        y = ista2._scaled(ista2._RMSNormFunction.apply(x, None), w)
        ours = torch.autograd.grad(y, [x] + ([w] if with_weight else []), grad.to(DEVICE))

        x64 = wide[:, 1].double().requires_grad_()
        w64 = weight.double().requires_grad_() if with_weight else torch.ones(c, dtype=torch.float64)
        eps = torch.finfo(torch.float32).eps  # the float32 eps for every dtype the kernels serve
        expected = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps) * w64
        assert torch.allclose(rms_norm(x64, w64), expected, atol=1e-6)  # the oracle's, with float64's eps
        theirs = torch.autograd.grad(expected, [x64] + ([w64] if with_weight else []), grad.double())
        assert_close(y, expected, dtype, 'y')
        assert_close(ours[0], theirs[0], dtype, 'grad_x')
        if with_weight:
            # a float32 sum of products of the output as kept, rounded to dtype: dtype's precision
            assert_close(ours[1], theirs[1], torch.float32, 'grad_weight', precision=dtype)
        assert kernel_calls == {'rms_norm_forward': 1, 'rms_norm_backward': 1}

    def _with_blocks(fn, blocks):
        return lambda *args, **kwargs: fn(*args, blocks=blocks, **kwargs)

    @pytest.mark.parametrize('dtype', DTYPES)
    @pytest.mark.parametrize('shape', ALIGNMENT_SHAPES)
    def test_alignment(kernel_calls, monkeypatch, dtype, shape):
        """The top-1 alignment kernels, forward and backward (both kernels), every dtype, odd sizes."""
        *sizes, blocks = shape
        if blocks is not None:
            for name in ('align_forward', 'align_backward'):
                monkeypatch.setattr(ista2_triton, name, _with_blocks(getattr(ista2_triton, name), blocks))
        check_alignment(dtype, *sizes, device=DEVICE)
        assert kernel_calls == {'align_forward': 1, 'align_backward': 1}

    def matches_the_oracle(m, q, k, v, images, rel_bias=None, mask=None, **call):
        """m's call in float32 on DEVICE against the oracle's in float64: output, and the gradients of a random
        projection of it w.r.t. q, k, v and the norm weights."""
        m.to(DEVICE)
        inputs = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
        wrt = inputs + list(m.parameters())
        device = {} if rel_bias is None else dict(relative_position_bias=rel_bias.to(DEVICE), mask=mask.to(DEVICE))
        out = m(*inputs, **device, **call)
        probe = torch.randn(out.shape, dtype=torch.float64)
        ours = torch.autograd.grad(out.double().cpu().mul(probe).sum(), wrt)
        m64 = copy.deepcopy(m).cpu().double()  # after the call: 'random' keeps the positions it drew
        inputs64 = [t.double().requires_grad_() for t in (q, k, v)]
        bias64 = [None if t is None else t.double() for t in (rel_bias, mask)]
        expected = naive_ista2(m64, *inputs64, images, *bias64)
        theirs = torch.autograd.grad((expected * probe).sum(), inputs64 + list(m64.parameters()))
        assert_close(out, expected, torch.float32, 'out')
        for name, a, b in zip(['q', 'k', 'v'] + [n for n, _ in m.named_parameters()], ours, theirs, strict=True):
            assert_close(a, b, torch.float32, name)

    @pytest.fixture(params=PATHS)
    def path(request, monkeypatch):
        monkeypatch.setattr(ista2, 'TRITON', request.param == 'triton')
        return request.param

    @pytest.mark.parametrize('rep', list(REPS))
    @pytest.mark.parametrize('bs_ratio', [None, 0.5])
    @pytest.mark.parametrize('topk', [1, 2])  # top-2: the norms in Triton, the alignment in torch
    def test_ista2_matches_the_oracle(kernel_calls, path, rep, bs_ratio, topk):
        """The whole call in float32 (q's RMSNorm weight folded into k's) against the oracle in float64."""
        torch.manual_seed(5)
        m = make(dim=6, heads=2, norm='rmsnorm', attn_inter_topk=topk, rep_tkn_type=rep, bs_ratio=bs_ratio,
                 **ALIGN, **REPS[rep]).eval()
        matches_the_oracle(m, *qkv(b=4, p1=7, p2=5, c=6), images=4)
        alignment = {'align_forward': 1, 'align_backward': 1} if topk == 1 else {}
        expected = {'rms_norm_forward': 3, 'rms_norm_backward': 3, **alignment} if path == 'triton' else {}
        assert kernel_calls == expected

    @pytest.mark.parametrize('real_b', [2, None])
    @pytest.mark.parametrize('rep', [None, 'mean', 'random'])
    def test_swin_windows_match_the_oracle(kernel_calls, path, real_b, rep):
        torch.manual_seed(6)
        m = make(dim=9, heads=3, is_swin=True, norm='rmsnorm', attn_inter_topk=1, rep_tkn_type=rep, **ALIGN,
                 **REPS[rep]).eval()
        images, windows, tokens = 2 + (real_b is None), 2, 5
        mask = torch.zeros(windows, tokens, tokens)
        mask[1, :2, 2:] = mask[1, 2:, :2] = -100.
        matches_the_oracle(m, *qkv(b=images * windows, p1=tokens, p2=tokens, c=9), images,
                           torch.randn(3, tokens, tokens), mask, real_b=real_b)
        assert kernel_calls.get('align_forward', 0) == (path == 'triton')

    @pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
    def test_half_precision_activations(kernel_calls, dtype):
        """bfloat16/float16 q, k, v with float32 norm weights (as under autocast): outputs and input
        gradients in the activations' dtype, float32 weight gradients, close to the float32 call."""
        torch.manual_seed(7)
        m = make(dim=32, heads=2, norm='rmsnorm', attn_inter_topk=1, rep_tkn_type='mean', **ALIGN).to(DEVICE).eval()
        q, k, v = (t.to(DEVICE) for t in qkv(b=3, p1=20, p2=20, c=32))
        reference = m(q, k, v)
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = m(*inputs)
        grads = torch.autograd.grad(out.float().sum(), inputs + list(m.parameters()))
        assert out.dtype == dtype and [g.dtype for g in grads] == [dtype] * 3 + [torch.float32] * 3
        assert all(g.isfinite().all() for g in grads)
        assert (out.float() - reference).abs().max() <= 10 * TOLERANCE[dtype] * reference.abs().max()
        assert kernel_calls == {'rms_norm_forward': 6, 'align_forward': 2, 'rms_norm_backward': 3,
                                'align_backward': 1}

    def saved_bytes(m, *inputs, **call):
        """Bytes one training call of m keeps for backward: every storage saved_tensors_hooks see, once and whole,
        parameters left out (as benchmarks/measure.py counts them)."""
        kept = {}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.setdefault(t.untyped_storage().data_ptr(), t),
                                                      lambda t: t):
            m(*[t.requires_grad_() for t in inputs], **call)
        parameters = {p.untyped_storage().data_ptr() for p in m.parameters()}
        return sum(t.untyped_storage().nbytes() for ptr, t in kept.items() if ptr not in parameters)

    @pytest.mark.parametrize('rep', ['mean', 'cls+bg'])
    @pytest.mark.parametrize('swin', [False, True])
    def test_the_kernels_keep_no_more_than_the_torch_path(triton_on, monkeypatch, swin, rep):
        """Issue 24 on the Triton path: an ISTA2 call (Swin's explicit attention with a bias, or the fused one) keeps
        no more for backward than the torch path, whose whole-model ratios tests/test_activation_memory.py checks
        (the winners are int32 here, int64 there)."""
        torch.manual_seed(9)
        m = make(dim=24, heads=2, is_swin=swin, norm='rmsnorm', attn_inter_topk=1, rep_tkn_type=rep, **ALIGN,
                 **REPS[rep]).to(DEVICE).train()
        inputs = [t.to(DEVICE) for t in qkv(b=4, p1=9, p2=9 if swin else 4, c=24)]
        call = dict(real_b=2, relative_position_bias=torch.randn(2, 9, 9, device=DEVICE)) if swin else {}
        found = saved_bytes(m, *[t.clone() for t in inputs], **call)
        monkeypatch.setattr(ista2, 'TRITON', False)
        assert found <= saved_bytes(m, *inputs, **call)

    @pytest.fixture
    def self_checks(triton_on, monkeypatch):
        """The Triton self-checks start afresh (and the process's record is restored afterwards); the
        (device type, dtype) of each check run, in order."""
        monkeypatch.setattr(ista2, 'TRITON_PROBES', {})
        runs, probe = [], ista2._triton_probe
        monkeypatch.setattr(ista2, '_triton_probe', lambda device, dtype: runs.append((device.type, dtype)) or
                            probe(device, dtype))
        return runs

    def ista2_call(dtype):
        """Output and input and weight gradients of one ISTA2 call (RMSNorms, top-1 alignment) on DEVICE in dtype,
        and the ISTA2 warnings it raised."""
        torch.manual_seed(8)
        m = make(dim=32, heads=2, norm='rmsnorm', attn_inter_topk=1, rep_tkn_type='mean', **ALIGN).to(DEVICE)
        inputs = [t.to(DEVICE, dtype).requires_grad_() for t in qkv(b=3, p1=20, p2=20, c=32)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            out = m(*inputs)
            results = (out, *torch.autograd.grad(out.float().sum(), inputs + list(m.parameters())))
        return results, [str(w.message) for w in caught if str(w.message).startswith('ISTA2:')]

    def the_torch_path_result(monkeypatch, results, dtype):
        """Whether results are those of `ista2_call` on the torch code path."""
        monkeypatch.setattr(ista2, 'TRITON', False)
        expected, _ = ista2_call(dtype)
        monkeypatch.setattr(ista2, 'TRITON', True)
        return all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(results, expected, strict=True))

    def test_the_self_check_passes_and_the_kernels_serve(self_checks, monkeypatch):
        """The real kernels pass their self-check in every dtype, once each, without touching the global random
        state, and then serve the ISTA2 call."""
        rng = torch.get_rng_state()
        assert all(ista2.triton_in_use(DEVICE, dtype) for dtype in DTYPES * 2)
        assert torch.equal(rng, torch.get_rng_state())
        device = torch.device(DEVICE).type
        assert self_checks == [(device, dtype) for dtype in DTYPES]
        assert ista2.TRITON_PROBES == {(device, dtype): True for dtype in DTYPES}
        calls = count_kernel_calls(monkeypatch)
        _, warned = ista2_call(torch.float32)
        assert not warned
        assert calls == {'rms_norm_forward': 3, 'align_forward': 1, 'rms_norm_backward': 3, 'align_backward': 1}

    def test_a_kernel_that_raises_leaves_the_torch_path(self_checks, monkeypatch):
        """A launcher that does not compile (say): one warning with the error's first line; the torch path serves."""
        def fails(*args, **kwargs):
            raise RuntimeError('Failed to compile the launcher: no C compiler\ncc: command not found')

        monkeypatch.setattr(ista2_triton, 'align_backward', fails)
        results, warned = ista2_call(torch.float32)
        assert len(warned) == 1, warned
        assert '(RuntimeError: Failed to compile the launcher: no C compiler)' in warned[0], warned
        assert 'ISTA2_TRITON=0' in warned[0] and 'command not found' not in warned[0], warned
        assert ista2.TRITON_PROBES == {(torch.device(DEVICE).type, torch.float32): False}
        assert the_torch_path_result(monkeypatch, results, torch.float32)

    def test_a_kernel_that_computes_wrong_values_leaves_the_torch_path(self_checks, monkeypatch):
        """An alignment off by 1 %: one warning naming the result and the error; the torch path serves."""
        align_forward = ista2_triton.align_forward

        def off_by_one_percent(*args, **kwargs):
            out, best, weight = align_forward(*args, **kwargs)
            return out * 1.01, best, weight

        monkeypatch.setattr(ista2_triton, 'align_forward', off_by_one_percent)
        results, warned = ista2_call(torch.float32)
        assert len(warned) == 1, warned
        assert 'alignment out differs from the torch code path by 1.0e-02' in warned[0], warned
        assert 'tolerance of 1.2e-06' in warned[0] and 'ISTA2_TRITON=0' in warned[0], warned
        assert not ista2.triton_in_use(DEVICE, torch.float32)
        assert the_torch_path_result(monkeypatch, results, torch.float32)

    def test_the_self_check_runs_once_per_device_type_and_dtype(self_checks, monkeypatch):
        """Two ISTA2 calls in float32, then two queries each for float32 and bfloat16: two checks, two warnings."""
        monkeypatch.setattr(ista2_triton, 'rms_norm_forward', lambda *args: 1 / 0)
        warned = [message for _ in range(2) for message in ista2_call(torch.float32)[1]]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            in_use = [ista2.triton_in_use(DEVICE, dtype) for dtype in (torch.float32, torch.bfloat16) * 2]
        assert in_use == [False] * 4
        warned += [str(w.message) for w in caught if str(w.message).startswith('ISTA2:')]
        device = torch.device(DEVICE).type
        assert self_checks == [(device, torch.float32), (device, torch.bfloat16)]
        assert len(warned) == 2 and all('ZeroDivisionError: division by zero' in message for message in warned)
        assert f'{device} torch.float32' in warned[0] and f'{device} torch.bfloat16' in warned[1], warned
