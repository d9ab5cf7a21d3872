"""`make gpu-check`: every CUDA-specific path in one command, and one report.

    python benchmarks/gpu_check.py [--parts ista2 trainers speed timm] [--backbones pvt swin cvt] [--budget 300]
                                   [--batch 128] [--warmup 5] [--steps 15] [--workdir DIR] [--json FILE]
    python benchmarks/gpu_check.py --device cpu --quick      # the CPU smoke mode of tests/test_gpu_check.py

Each part runs in a process of its own (a crash, a hang or a CUDA error that poisons its context stays there: its
lines so far are kept and a FAIL line says how it ended, with the end of its output), its output shown and kept in
the work folder as <part>.log. The parts, in order of value, so that a short budget keeps the most useful:

0. preflight (always first): the CUDA device and its compute capability, a C compiler and Python's headers (Triton
   builds a launcher per kernel with them), libcuda, one small Triton launch (ISTA2's kernels checking themselves
   against the torch path: common.ista2.triton_in_use), an NCCL process group of one process (all_reduce,
   all_gather, broadcast, barrier); and the report's header: device, driver, CUDA, cuDNN, NCCL, torch, Triton.
1. ista2: ISTA2's forward and backward on the device, on each of its code paths there (the default one, with the
   Triton kernels on CUDA, and the torch path), in fp32 (TF32 off) and under fp16 and bf16 autocast (q, k, v handed
   over in that dtype), against a CPU float64 reference: five small cases (every representative-token type,
   top-k > 1, bs_ratio, LayerNorm, Swin windows with shift mask and position bias) whose float64 module is itself
   checked against the per-token loop of common/ista2_oracle.py and finite differences, and stage shapes of
   PVTv2-B0, Swin-T, CvT-13 and PVTv2-B2 (top-3 over all tokens) at 32 images. The reference is evaluated at the
   winners the device chose (common.ista2.ISTA2.keep_winners): a near tie may go either way in another precision
   or summation order, so flips are counted, not failed, unless the device's winner scores more than WINNER_TOL
   below float64's best (a wrong winner). fp32 must match to FP32_TOL; autocast errors may be at most
   AUTOCAST_FACTOR times those of the same call under CPU autocast. Each case runs on its own: an exception fails
   its line with its traceback, and the others still run. Last, whether the Triton kernels serve every dtype.
2. trainers: each backbone's trainer through its real launcher (torchrun for PVT and Swin, run.sh for CvT, via
   common.launch) with --nproc_per_node 1 and AMP on, its CIFAR ISTA2 config on a generated 32 px dataset (320
   training images, batch 32): train 2 epochs; the checkpoint's grad-scaler state must have moved from its initial
   one; rerun with 3 epochs: it must auto-resume from the run folder, and its first AMP step must start from the
   checkpoint's scaler state (read inside the trainer process by benchmarks/gpu_check_site/sitecustomize.py);
   evaluate with PVT --dist-eval, Swin's sharded evaluation, CvT run.sh -t test. On CUDA a torchrun launch joins
   an NCCL group even alone (common/runtime.py); the multi-process paths need 2 or more GPUs.
3. speed: the paper's four pairs at batch 128 per GPU, fp16 autocast with a grad scaler as the trainers run,
   224 px: the train step of benchmarks/measure.py's TrainStep (forward, cross-entropy, backward, AdamW; timed
   after the warm-up and the grad scaler's settling, peak memory counted from then on), images/s, peak GPU memory,
   the memory one forward saves for backward (measure.saved_for_backward), ISTA2/baseline ratios.
4. timm: our PVTv2-B0, PVTv2-B2 and Swin-T baselines against timm's own models holding the same weights (through
   timm's checkpoint_filter_fn): equal outputs in fp32 (TF32 off), and both train steps timed in part 3's setting.

Time: on CUDA the whole check has a budget (--budget, default BUDGET_S): before each part, its cost is estimated
from what it will launch (COST: Triton compilations, cases, trainer launches, models; estimates until a GPU run
measures them, and the report prints each part's estimate beside its time); a part that does not fit in what is
left is a SKIP that says how to run it alone, and a part still running when the budget is spent is stopped.

Every line of the report is PASS, FAIL or SKIP (with the reason) beside the measured figure and its target; the
JSON (--json) also holds each failure's whole traceback. The exit status is 1 if a correctness check fails or a
part crashes, 2 without a GPU (unless --device cpu); the speed targets (ISTA2/baseline train step <= 1.05, peak
memory <= 1.10 and saved for backward <= 1.03, ours/timm <= 1.02) are marked * and printed, never asserted. It
needs the repository and the packages of requirements.txt, nothing else: no network, no dataset, no pretrained
weights, not the test suite (on a lent GPU without network: the image's own torch and the wheels of `make
gpu-wheels`, see docs/reproduce.md). Logs and runs go to --workdir (a temporary folder, kept if anything fails).

--quick (either device) keeps every code path at tiny sizes: stage shapes of 2 images, trainers at batch 4 on 40
images, the speed part on the registry's CIFAR pairs at 32 px and batch 2 for one step, the timm timing for the
first pair only; its speed targets are SKIPped (they are for batch 128, AMP, 224 px on a GPU). On the CPU there is
no NCCL (the same collectives run on gloo instead) and the trainers use neither AMP nor a grad scaler: those checks
are SKIPs that say so.
"""
import argparse
import collections
import contextlib
import copy
import functools
import gc
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (ROOT, HERE) if p not in sys.path]
from common import checkpoint, launch  # noqa: E402
from common import ista2 as ista2_module  # noqa: E402
from common.backbones import BACKBONES, config_name  # noqa: E402
from common.demo_data import CLASSES, generate  # noqa: E402
from common.ista2 import ISTA2, _scaled, _weighted  # noqa: E402
from common.ista2_oracle import naive_ista2  # noqa: E402

from measure import TrainStep  # noqa: E402

PROBE_SITE = os.path.join(ROOT, 'benchmarks', 'gpu_check_site')
PARTS = ('ista2', 'trainers', 'speed', 'timm')  # by value: what a short budget keeps first

# Targets: correctness tolerances (asserted) and speed targets (reported)
FP32_TOL = {'forward': 1e-5, 'backward': 1e-4}  # max |error| / max |oracle|, per tensor (rel_error 'max')
# autocast: rms error / rms oracle per tensor, at most this many times that of the same call under CPU autocast
AUTOCAST_FACTOR = 3
# a winner that scores within this fraction of the largest |score| of float64's best is a near tie, not an error
WINNER_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}
PATCHED_FP32_TOL = 1e-4  # a timm model patched with ISTA2, fp32 against float64 (rms error / rms, per tensor)
FD_TOL = 1e-6  # float64 backward against finite differences of the per-token oracle (relative)
TIMM_TOL = 1e-4  # our baseline against timm's with the same weights, fp32, TF32 off (max error / max logit)
TIME_RATIO, MEMORY_RATIO, SAVED_RATIO, TIMM_RATIO = 1.05, 1.10, 1.03, 1.02
BUDGET_S = 300
DEFAULT_SCALER = {'scale': 65536.0, '_growth_tracker': 0}  # torch.amp.GradScaler's initial state


@dataclass
class Line:
    part: str
    check: str
    status: str  # PASS, FAIL or SKIP
    measured: str = ''
    target: str = ''
    note: str = ''
    asserted: bool = True  # False: a speed target, reported only
    traceback: str = ''  # of the exceptions behind a FAIL, whole


class Report:
    """The lines of every part, in order, each part's title, estimate and wall time, and the header (versions).
    sink: a file each line is appended to as it is made, one JSON object a line (a worker's)."""

    def __init__(self, sink=None):
        self.lines, self.titles, self.seconds, self.estimates = [], {}, {}, {}
        self.header, self.sink = '', sink

    def write(self, record):
        if self.sink:
            with open(self.sink, 'a') as f:
                f.write(json.dumps(record) + '\n')

    def add(self, part, check, ok, measured='', target='', note='', asserted=True, traceback=''):
        status = ok if isinstance(ok, str) else ('PASS' if ok else 'FAIL')
        line = Line(part, check, status, measured, target, note, asserted, traceback)
        self.lines.append(line)
        self.write(asdict(line))
        progress(f'{part}: {status} {check} {measured}')

    def skip(self, part, check, why, measured='', target='', asserted=True):
        self.add(part, check, 'SKIP', measured, target, why, asserted)

    def failed(self):
        return [line for line in self.lines if line.asserted and line.status == 'FAIL']

    def exit_status(self):
        return 1 if self.failed() else 0

    def text(self, header):
        out = [header]
        for part, title in self.titles.items():
            lines = [line for line in self.lines if line.part == part]
            timing = f'{self.seconds[part]:.0f} s' if part in self.seconds else 'not run'
            if part in self.estimates:
                timing += f', estimated {self.estimates[part]:.0f} s'
            out += ['', f'{title} ({timing})']
            rows = [('status', 'check', 'measured', 'target', 'note')] + [
                (line.status + ('' if line.asserted else '*'), line.check, line.measured, line.target, line.note)
                for line in lines]
            widths = [max(len(r[i]) for r in rows) for i in range(4)]
            out += ['  ' + '  '.join(f'{cell:{w}}' for cell, w in zip(r[:4], widths, strict=True)) +
                    (f'  {r[4]}' if r[4] else '') for r in rows]
        counts = {s: sum(line.status == s for line in self.lines if line.asserted) for s in ('PASS', 'FAIL', 'SKIP')}
        speed = [line for line in self.lines if not line.asserted]
        met = sum(line.status == 'PASS' for line in speed)
        missed = sum(line.status == 'FAIL' for line in speed)
        out += ['', f'checks: {counts["PASS"]} PASS, {counts["FAIL"]} FAIL, {counts["SKIP"]} SKIP; '
                f'* targets (reported, not asserted): {met} met, {missed} missed, {len(speed) - met - missed} skipped; '
                f'exit status {self.exit_status()}']
        return '\n'.join(out)


def progress(message):
    print(f'[gpu-check] {message}', file=sys.stderr, flush=True)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def rel_error(actual, expected, kind='max', floor=0.):
    """|actual - expected| / |expected|, both measured as the max (kind 'max') or the root mean square
    ('rms') over the elements; the denominator is at least `floor` (and never 0)."""
    diff = actual.detach().double().cpu() - expected.detach().double().cpu()
    expected = expected.detach().double().cpu()
    if kind == 'max':
        num, den = diff.abs().max().item(), expected.abs().max().item()
    else:
        num, den = diff.pow(2).mean().sqrt().item(), expected.pow(2).mean().sqrt().item()
    return num / max(den, floor, 1e-300)


def grads_error(grads, expected, kind):
    """The worst rel_error over the gradients; a gradient under 10% of the largest (e.g. the gradient of the
    k norm's bias, which softmax cancels: zero up to rounding) is measured against 10% of the largest."""
    scales = [g.abs().max().item() if kind == 'max' else g.double().pow(2).mean().sqrt().item()
              for g in expected.values()]
    floor = 0.1 * max(scales)
    return max(rel_error(grads[n], expected[n], kind, floor) for n in expected)


def finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@contextlib.contextmanager
def settings(obj, **values):
    """Set attributes of `obj` (a module or object) that it has, and restore them afterwards."""
    old = {k: getattr(obj, k) for k in values if hasattr(obj, k)}
    for k in old:
        setattr(obj, k, values[k])
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


@contextlib.contextmanager
def no_tf32():
    """fp32 means fp32: TF32 off for cuBLAS and cuDNN while comparing with an oracle."""
    with settings(torch.backends.cuda.matmul, allow_tf32=False), settings(torch.backends.cudnn, allow_tf32=False):
        yield


# ---------------------------------------------------------------------------------------------- 1. ISTA2

PUBLISHED = dict(qk_norm=True, v_norm=True, ista2_method='v', attn_inter_topk=1, rep_tkn_type='mean')


@dataclass(frozen=True)
class Case:
    """One ISTA2 call: `images` images of `windows` rows each (Swin windows; 1 otherwise)."""
    name: str
    options: dict
    images: int
    p1: int
    p2: int
    dim: int
    heads: int
    windows: int = 1
    swin: bool = False  # is_swin, with a shift mask (nW, p1, p2) and a position bias (h, p1, p2)
    fd_inputs: tuple = ('q', 'k', 'v')  # the inputs whose gradient is the derivative of the forward


SMALL_CASES = [  # against the per-token loop of common/ista2_oracle.py
    Case('mean, top-1, RMSNorm (published)', PUBLISHED, images=4, p1=7, p2=5, dim=8, heads=2),
    Case('all tokens, top-3, bs_ratio 0.5, LayerNorm',
         dict(PUBLISHED, norm_type='layernorm', attn_inter_topk=3, rep_tkn_type=None, bs_ratio=0.5),
         images=4, p1=5, p2=5, dim=8, heads=2),
    Case('cls+bg (CvT)', dict(PUBLISHED, rep_tkn_type='cls+bg', cls_tkn_idx=1, bg_tkn_idx=0),
         images=4, p1=6, p2=6, dim=8, heads=2, fd_inputs=('v',)),  # the bg query's logits stop q's and k's gradient
    Case('random tokens, top-2', dict(PUBLISHED, rep_tkn_type='random', rep_tkn_ratio=0.4, attn_inter_topk=2),
         images=4, p1=5, p2=10, dim=8, heads=2),
    Case('Swin windows, shift mask, position bias', PUBLISHED, images=3, p1=4, p2=4, dim=6, heads=2, windows=2,
         swin=True),
]


def stage_cases(quick):
    """Stage shapes of the three backbones (batch 128 would make the CPU float64 reference slow)."""
    n = 2 if quick else 32
    return [
        Case('PVTv2-B0 stage 1', PUBLISHED, images=n, p1=196 if quick else 3136, p2=49, dim=32, heads=1),
        Case('Swin-T stage 1', PUBLISHED, images=n, p1=49, p2=49, dim=96, heads=3, windows=4 if quick else 64,
             swin=True),
        Case('CvT-13 stage 3', dict(PUBLISHED, rep_tkn_type='cls+bg', cls_tkn_idx=1, bg_tkn_idx=0),
             images=n, p1=2 + (16 if quick else 196), p2=2 + (4 if quick else 49), dim=384, heads=6),
        Case('PVTv2-B2 stage 2, all tokens, top-3', dict(PUBLISHED, rep_tkn_type=None, attn_inter_topk=3),
             images=n, p1=64 if quick else 784, p2=16 if quick else 49, dim=128, heads=2),
    ]


def build_case(case, seed=0):
    """(float64 CPU module in eval mode, inputs dict, output weights g): the loss is sum(out * g)."""
    gen = torch.Generator().manual_seed(seed)
    d = case.dim // case.heads
    module = ISTA2(case.dim, case.heads, qk_scale=d ** -0.5, v_scale=d ** -0.5, is_swin=case.swin,
                   **case.options).double().eval()  # eval: 'random' draws its tokens from a fixed generator
    with torch.no_grad():
        for p in module.parameters():  # norms that are not the identity, so that they are tested too
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.5)
    b = case.images * case.windows
    inputs = {name: torch.randn(b, p, case.dim, generator=gen, dtype=torch.float64)
              for name, p in (('q', case.p1), ('k', case.p2), ('v', case.p2))}
    if case.swin:
        inputs['relative_position_bias'] = torch.randn(case.heads, case.p1, case.p2, generator=gen, dtype=torch.float64)
        mask = torch.zeros(case.windows, case.p1, case.p2, dtype=torch.float64)
        half = case.p2 // 2
        mask[1:, :, half:] = -100.  # every window but the first sees only half of its keys, as after a shift
        inputs['mask'] = mask
    g = torch.randn(b, case.p1, case.dim, generator=gen, dtype=torch.float64)
    return module, inputs, g


def call(module, inputs):
    return module(inputs['q'], inputs['k'], inputs['v'], relative_position_bias=inputs.get('relative_position_bias'),
                  mask=inputs.get('mask'))


def forward_backward(module, inputs, g, device, dtype=None):
    """Output, gradients (q, k, v and every parameter) of sum(out * g), and the winners the alignment chose
    ((m, T, h, k), common.ista2.ISTA2.winners); dtype: autocast to it, with q, k and v handed over in it.
    Tensors come back on the CPU, output and gradients in float64."""
    module = copy.deepcopy(module).float().to(device)
    module.keep_winners = True
    leaves = {}
    moved = {}
    for name, x in inputs.items():
        x = x.to(device, torch.float32)
        if name in ('q', 'k', 'v'):
            x = x.to(dtype or torch.float32).requires_grad_()
            leaves[name] = x
        moved[name] = x
    with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
        out = call(module, moved)
    (out.float() * g.to(device, torch.float32)).sum().backward()
    grads = {**{n: x.grad for n, x in leaves.items()}, **{n: p.grad for n, p in module.named_parameters()}}
    return out.detach().double().cpu(), {n: t.detach().double().cpu() for n, t in grads.items()}, module.winners.cpu()


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def mix_at(v, candidates, winners, heads, scale):
    """ISTA2's mixing step with given winners: v (m, T, c), candidates (n, c), winners (m, T, h, k) indices into
    the candidates -> (m, T, c), each token and head softmax([s v.v, s v.r for its k winners])-mixed with them."""
    m, tokens, c = v.shape
    v_heads, candidates = v.view(m, tokens, heads, -1), candidates.view(-1, heads, c // heads)
    chosen = candidates[winners, torch.arange(heads).view(heads, 1)]  # (m, T, h, k, d)
    logits = torch.cat([(v_heads * v_heads).sum(-1, keepdim=True), (v_heads.unsqueeze(-2) * chosen).sum(-1)], -1)
    weights = (logits * scale).softmax(-1)
    return (weights[..., :1] * v_heads + (weights[..., 1:, None] * chosen).sum(-2)).reshape(m, tokens, c)


class Reference:
    """A case's float64 module on the CPU: its output and gradients with the winners it chooses itself or with
    a device's winners (a near tie, the best two scores a few ulps apart, may go either way on another device
    or in another precision: the comparison holds the winners fixed and counts the flips), and every token's
    float64 scores, to tell a near tie from a wrong winner.

    The module's own result is checked against the per-token loop (`oracle`, small cases: forward; backward
    where the loop is differentiable, then its gradients are the reference) and the gradients against central
    differences of the loop; `oracle_error` is the largest of those relative errors (None without a loop)."""

    def __init__(self, case, oracle=None):
        self.case = case
        self.module, self.inputs, self.g = build_case(case)
        self.module.keep_winners = True
        self.out, self.grads, self.pool = self._run(None)
        self.winners = self.module.winners
        self.oracle_error = None if oracle is None else self._check_against(oracle)
        v, candidates, allowed = self.pool
        heads = self.module.num_heads
        scores = torch.einsum('mthd,nhd->mthn', v.view(*v.shape[:2], heads, -1), candidates.view(len(candidates),
                              heads, -1)) * self.module.v_scale
        self.scores = scores.masked_fill(~allowed[:, None, None], float('-inf'))  # (m, T, h, n)
        self.largest_score = self.scores[self.scores.isfinite()].abs().max()

    def _run(self, winners):
        """(out, grads, (v, candidates, allowed) of the alignment) with the module's winners, or `winners`."""
        module, captured = self.module, []

        def mix(v, weight, candidates, allowed, topk):  # v to be scaled by the v norm's weight (or None)
            captured.append((_scaled(v, weight).detach(), candidates.detach(), allowed))
            if winners is None:
                return ISTA2._mix(module, v, weight, candidates, allowed, topk)
            return mix_at(_weighted(v, weight), candidates, winners, module.num_heads, module.v_scale), None

        module._mix = mix  # an instance attribute, for this call only
        try:
            leaves = {n: self.inputs[n].clone().requires_grad_() for n in ('q', 'k', 'v')}
            out = call(module, {**self.inputs, **leaves})
            grads = self._grads(out, leaves)
        finally:
            del module._mix
        return out.detach(), grads, captured[0]

    def _grads(self, out, leaves):
        wrt = {**leaves, **dict(self.module.named_parameters())}
        found = torch.autograd.grad((out * self.g).sum(), list(wrt.values()), allow_unused=True)
        return {n: (t if t is not None else torch.zeros_like(wrt[n])).detach() for n, t in zip(wrt, found, strict=True)}

    def _check_against(self, oracle):
        case, inputs, g = self.case, self.inputs, self.g

        def loop(x):
            return oracle(self.module, x['q'], x['k'], x['v'], case.images, rel_bias=x.get('relative_position_bias'),
                          mask=x.get('mask'))

        leaves = {n: inputs[n].clone().requires_grad_() for n in ('q', 'k', 'v')}
        expected = loop({**inputs, **leaves})  # after the module's call: 'random' reuses the tokens it drew
        errors = [rel_error(self.out, expected)]
        if expected.requires_grad:  # a differentiable loop: its gradients are the reference
            loop_grads = self._grads(expected, leaves)
            errors.append(grads_error(self.grads, loop_grads, 'max'))
            self.grads = loop_grads
        self.out = expected.detach()
        gen = torch.Generator().manual_seed(1)
        direction = {n: torch.randn(inputs[n].shape, generator=gen, dtype=torch.float64) for n in case.fd_inputs}
        eps = 1e-6
        with torch.no_grad():
            plus = (loop({**inputs, **{n: inputs[n] + eps * u for n, u in direction.items()}}) * g).sum()
            minus = (loop({**inputs, **{n: inputs[n] - eps * u for n, u in direction.items()}}) * g).sum()
        numeric = float((plus - minus) / (2 * eps))
        analytic = float(sum((self.grads[n] * u).sum() for n, u in direction.items()))
        errors.append(abs(numeric - analytic) / max(abs(numeric), 1e-12))
        return max(errors)

    def at(self, winners):
        """(out, grads, flips) with `winners` (m, T, h, k): flips counts the (token, head) whose winners are
        not those float64 chose."""
        winners = winners.view(self.winners.shape)
        flips = int((winners.sort(-1).values != self.winners.sort(-1).values).any(-1).sum())
        if not flips:
            return self.out, self.grads, 0
        out, grads, _ = self._run(winners)
        return out, grads, flips

    def wrong_winners(self, winners, dtype):
        """How many (token, head) chose a barred candidate, or one scoring more than WINNER_TOL[dtype] x the
        largest |score| below float64's k-th best: no near tie, a wrong winner."""
        winners = winners.view(self.winners.shape)
        kth_best = self.scores.topk(winners.shape[-1], -1).values[..., -1]
        worst_chosen = self.scores.gather(-1, winners).min(-1).values
        return int((kth_best - worst_chosen > WINNER_TOL[dtype] * self.largest_score).sum())


def code_paths(device):
    """ISTA2's code paths on `device`: name -> the common.ista2 flags that select it."""
    default = 'default path' + (' (Triton)' if device.type == 'cuda' and getattr(ista2_module, 'TRITON', False)
                                else ' (fused C++ kernels)' if device.type == 'cpu' and ista2_module.CPU_KERNELS
                                else '')
    paths = {default: {}}
    flags = ('TRITON',) if device.type == 'cuda' else ('CPU_KERNELS',)
    torch_path = {k: False for k in flags if getattr(ista2_module, k, False)}
    if torch_path:
        paths['torch path (' + ', '.join(f'{k}=False' for k in torch_path) + ')'] = torch_path
    return paths


PRECISIONS = {torch.float32: 'fp32', torch.float16: 'fp16 autocast', torch.bfloat16: 'bf16 autocast'}


def errors_at_winners(ref, out, grads, winners, dtype):
    """{'forward', 'backward'} relative errors (fp32: max; autocast: rms) against the float64 reference at the
    run's own winners, and (flips, wrong winners)."""
    kind = 'max' if dtype == torch.float32 else 'rms'
    expected_out, expected_grads, flips = ref.at(winners)
    errors = {'forward': rel_error(out, expected_out, kind), 'backward': grads_error(grads, expected_grads, kind)}
    return errors, (flips, ref.wrong_winners(winners, dtype))


def autocast_tolerances(ref):
    """{dtype: {'forward', 'backward'}}: AUTOCAST_FACTOR x the errors of the same call on the CPU, under CPU
    autocast to dtype (the torch path: the errors of rounding to that dtype), floored at the dtype's epsilon."""
    tolerances = {}
    for dtype in (torch.float16, torch.bfloat16):
        out, grads, winners = forward_backward(ref.module, ref.inputs, ref.g, torch.device('cpu'), dtype)
        errors, _ = errors_at_winners(ref, out, grads, winners, dtype)
        tolerances[dtype] = {k: max(AUTOCAST_FACTOR * e, torch.finfo(dtype).eps) for k, e in errors.items()}
    return tolerances


def check_ista2(report, device, quick):
    """Each code path x precision x group of cases: one line with the worst errors against the float64 reference
    at the device's winners, the flips, and the cases that failed (each case runs on its own: an exception is
    that case's failure, with its traceback in the line)."""
    part = 'ista2'
    with default_dtype(torch.float64):  # the loop makes its output tensor in the default dtype
        groups = {'small cases vs per-token loop': [Reference(c, naive_ista2) for c in SMALL_CASES],
                  'stage shapes vs CPU float64 module': [Reference(c) for c in stage_cases(quick)]}
        tolerances = {id(ref): autocast_tolerances(ref) for refs in groups.values() for ref in refs}
    fd = max(ref.oracle_error for ref in groups['small cases vs per-token loop'])
    report.add(part, 'float64 oracle: module = loop (fwd, bwd); bwd = finite differences of the loop', fd <= FD_TOL,
               f'{fd:.1e}', f'<= {FD_TOL:.0e}', 'CPU, float64')
    for path, flags in code_paths(device).items():
        with settings(ista2_module, **flags), no_tf32():
            for dtype, precision in PRECISIONS.items():
                for group, refs in groups.items():
                    check_group(report, device, f'{precision}, {path}, {group} ({len(refs)})', refs, dtype,
                                tolerances)


def check_group(report, device, check, refs, dtype, tolerances):
    worst = {'forward': (0., ''), 'backward': (0., '')}  # (error / tolerance, case)
    errors_seen = {'forward': 0., 'backward': 0.}
    problems, tracebacks, flips, winners_counted = [], [], 0, 0
    for ref in refs:
        name = ref.case.name
        try:
            out, grads, winners = forward_backward(ref.module, ref.inputs, ref.g, device,
                                                   None if dtype == torch.float32 else dtype)
            if not finite(out, *grads.values()):
                problems.append(f'{name}: non-finite')
            errors, (case_flips, wrong) = errors_at_winners(ref, out, grads, winners, dtype)
        except Exception as error:
            problems.append(f'{name}: {type(error).__name__}: {str(error).partition(chr(10))[0][:200]}')
            tracebacks.append(traceback.format_exc())
            if not cuda_usable(device):
                problems.append('the CUDA context is lost: later cases cannot run in this process')
                break
            continue
        flips, winners_counted = flips + case_flips, winners_counted + winners[..., 0].numel()
        if wrong:
            problems.append(f'{name}: {wrong} wrong winners')
        tol = FP32_TOL if dtype == torch.float32 else tolerances[id(ref)][dtype]
        for k, e in errors.items():
            errors_seen[k] = max(errors_seen[k], e)
            if not e / tol[k] <= worst[k][0]:  # NaN included
                worst[k] = (e / tol[k], name)
    ok = not problems and all(worst[k][0] <= 1 for k in worst)
    kind = 'max' if dtype == torch.float32 else 'rms'
    share = max(worst['forward'][0], worst['backward'][0])
    measured = (f'{kind} fwd {errors_seen["forward"]:.1e}, bwd {errors_seen["backward"]:.1e} ({share:.2f} of the '
                f'tolerance at most); {flips} near-tie flips of {winners_counted} winners')
    target = (f'<= {FP32_TOL["forward"]:g} / {FP32_TOL["backward"]:g}' if dtype == torch.float32
              else f'<= {AUTOCAST_FACTOR}x CPU autocast\'s error')
    names = dict.fromkeys((worst['forward'][1], worst['backward'][1]))
    note = '; '.join(problems) + ('; ' if problems else '') + 'closest to its tolerance: ' + ' / '.join(names)
    report.add('ista2', check, ok, measured, target, note, traceback='\n'.join(tracebacks))


def check_timm_patched(report, device):
    """A timm model patched with ISTA2 (DeiT-Tiny, the published options, 64 px, 4 images), forward and backward
    (loss: mean square of the logits) in fp32 and under each autocast dtype on the device, against the CPU float64
    model: fp32 within PATCHED_FP32_TOL (rms: a near-tie flip moves a whole token), autocast within
    AUTOCAST_FACTOR x the error of the same autocast run on the CPU. Call it with TF32 off."""
    import timm

    import common.timm_ista2  # noqa: F401  (registers <name>_ista2)
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_224_ista2', img_size=64).train()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def run(where, dtype):
        """(logits, gradients) as float64 on the CPU; dtype None: the model in float64, float32: fp32."""
        net = copy.deepcopy(model).to(where, torch.float64 if dtype is None else torch.float32)
        x = images.to(where, next(net.parameters()).dtype)
        with torch.autocast(where.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16)):
            logits = net(x)
        logits.float().square().mean().backward()
        return logits.detach().double().cpu(), {n: p.grad.double().cpu() for n, p in net.named_parameters()}

    def errors(result):
        return max(rel_error(result[0], expected[0], 'rms'), grads_error(result[1], expected[1], 'rms'))

    check = 'patch_timm: DeiT-Tiny + ISTA2 (published options), forward and backward'
    try:
        expected, cpu = run(torch.device('cpu'), None), torch.device('cpu')
        found = {'fp32': errors(run(device, torch.float32))}
        ok, targets = found['fp32'] <= PATCHED_FP32_TOL, [f'fp32 <= {PATCHED_FP32_TOL:g}']
        for dtype in (torch.float16, torch.bfloat16):
            name = PRECISIONS[dtype].split()[0]
            found[name] = errors(run(device, dtype))
            tolerance = max(AUTOCAST_FACTOR * errors(run(cpu, dtype)), torch.finfo(dtype).eps)
            ok &= found[name] <= tolerance
            targets.append(f'{name} <= {tolerance:.1e}')
        report.add('ista2', check, ok, 'rms ' + ', '.join(f'{k} {v:.1e}' for k, v in found.items()), '; '.join(targets),
                   f'vs the CPU float64 model; autocast: {AUTOCAST_FACTOR}x CPU autocast\'s error')
    except Exception as error:
        report.add('ista2', check, False, type(error).__name__, 'no exception', str(error).partition('\n')[0][:300],
                   traceback=traceback.format_exc())


def cuda_usable(device):
    """False once an error (an illegal memory access, say) has poisoned the CUDA context of this process."""
    if device.type != 'cuda':
        return True
    try:
        torch.cuda.synchronize(device)
        return True
    except Exception:
        return False


def part_ista2(report, device, quick):
    """check_ista2, then whether ISTA2's kernels served the device: Triton on CUDA (its self-check passed for
    each dtype, common.ista2.triton_in_use), the fused C++ kernels on the CPU."""
    check_ista2(report, device, quick)
    with no_tf32():
        check_timm_patched(report, device)
    if device.type == 'cuda':
        check = 'ISTA2\'s Triton kernels in use (loaded, self-check passed) for fp32, fp16, bf16'
        if not getattr(ista2_module, 'TRITON', False):
            report.skip('ista2', check, 'common.ista2.TRITON is off (ISTA2_TRITON=0?): only the torch path ran')
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            served = {PRECISIONS[d]: ista2_module.triton_in_use(device, d) for d in PRECISIONS}
        why = '; '.join(str(w.message) for w in caught if str(w.message).startswith('ISTA2:'))
        report.add('ista2', check, all(served.values()), ', '.join(f'{k} {"yes" if v else "NO"}'
                                                                    for k, v in served.items()), 'all yes', why[:500])
    else:
        check = 'ISTA2\'s fused C++ kernels in use (float32, float64)'
        if not ista2_module.CPU_KERNELS:
            report.skip('ista2', check, 'common.ista2.CPU_KERNELS is off (ISTA2_CPU_KERNELS=0?): only the torch '
                        'path ran')
            return
        report.add('ista2', check, ista2_module._load_cpu_kernels() is not None, 'built and loaded', 'loaded')


# ---------------------------------------------------------------------------------------------- 0. preflight

def versions(device):
    """The header: device, driver, and the versions of everything the GPU paths use."""
    import numpy
    import timm
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = 'none'
    found = [f'torch {torch.__version__}', f'timm {timm.__version__}', f'triton {triton_version}',
             f'numpy {numpy.__version__}', f'Python {sys.version.split()[0]}']
    if device.type != 'cuda':
        return f'CPU, {torch.get_num_threads()} threads; ' + ', '.join(found)
    nccl = '.'.join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else 'none'
    try:
        driver = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader', '-i', '0'],
                                capture_output=True, text=True, timeout=30).stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        driver = 'unknown (no nvidia-smi)'
    return (f'{torch.cuda.get_device_name(device)}, driver {driver}; CUDA {torch.version.cuda}, '
            f'cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}; ' + ', '.join(found))


def c_compiler():
    """The compiler Triton builds its launchers with ($CC, else cc, gcc or clang on PATH), or None."""
    return os.environ.get('CC') or next(filter(None, map(shutil.which, ('cc', 'gcc', 'clang'))), None)


def libcuda():
    """Where the CUDA driver library is, as Triton finds it, or None."""
    try:
        from triton.backends.nvidia.driver import libcuda_dirs
        return ', '.join(libcuda_dirs()) or None
    except Exception:  # another Triton layout, or none found: ask the dynamic loader
        import ctypes.util
        return ctypes.util.find_library('cuda')


def part_preflight(report, device):
    """One line for each thing the GPU paths need, cheapest first; the NCCL group last."""
    part, cuda = 'preflight', device.type == 'cuda'
    no_gpu = 'no CUDA device (--device cpu)'
    report.header = versions(device)
    if cuda:
        count = torch.cuda.device_count()
        report.add(part, 'CUDA device visible', True, f'{count} device(s); using {torch.cuda.get_device_name(device)}')
        capability = torch.cuda.get_device_capability(device)
        report.add(part, 'compute capability (Triton kernels: >= 7.0; bfloat16 ones >= 8.0)', capability >= (8, 0),
                   '.'.join(map(str, capability)), '>= 8.0')
    else:
        report.skip(part, 'CUDA device visible', no_gpu)
    compiler = c_compiler()
    report.add(part, 'C compiler (Triton\'s launchers; the CPU kernels use c++)', compiler is not None,
               compiler or 'none of $CC, cc, gcc, clang', 'found')
    headers = os.path.join(sysconfig.get_paths()['include'], 'Python.h')
    report.add(part, 'Python headers (Triton\'s launchers)', os.path.isfile(headers), headers, 'exists')
    if cuda:
        found = libcuda()
        report.add(part, 'libcuda (the driver library Triton links)', found is not None, found or 'not found', 'found')
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            served = ista2_module.triton_in_use(device, torch.float32)
        why = '; '.join(str(w.message) for w in caught if str(w.message).startswith('ISTA2:'))
        report.add(part, 'one small Triton launch (ISTA2\'s kernels against the torch path, fp32)', served,
                   'compiled, ran and agreed' if served else 'failed', 'agrees', why[:500])
    else:
        report.skip(part, 'libcuda (the driver library Triton links)', no_gpu)
        report.skip(part, 'one small Triton launch', no_gpu)
    process_group(report, device)


def process_group(report, device):
    """A process group of one process (NCCL on CUDA, gloo standing in on the CPU): all_reduce, all_gather,
    broadcast and barrier leave the values as they are."""
    import torch.distributed as dist
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    kept = []  # tensors stay referenced until the group is gone (see common.runtime._last_reduced)
    dist.init_process_group(backend, init_method=f'tcp://127.0.0.1:{launch.free_port()}', rank=0, world_size=1)
    try:
        x = torch.arange(6., device=device)
        gathered = [torch.empty_like(x)]
        dist.all_reduce(x)
        dist.all_gather(gathered, x)
        dist.broadcast(x, src=0)
        dist.barrier()
        sync(device)
        kept += [x, *gathered]
        ok = torch.equal(gathered[0].cpu(), torch.arange(6.)) and torch.equal(x.cpu(), torch.arange(6.))
        measured = f'{backend}: all_reduce, all_gather, broadcast, barrier ' + ('ok' if ok else 'wrong values')
    finally:
        dist.destroy_process_group()
    if device.type == 'cuda':
        report.add('preflight', 'NCCL process group of 1 process on the GPU', ok, measured, 'values unchanged')
    elif not ok:
        report.add('preflight', 'gloo stand-in for NCCL', False, measured, 'values unchanged')
    else:
        report.skip('preflight', 'NCCL process group',
                    'no CUDA device: NCCL needs a GPU; the same collectives ran on gloo', measured)


# ---------------------------------------------------------------------------------------------- 3. trainers

# what switches AMP on in each front end (PVT: always on CUDA), and how each evaluates in a distributed way
AMP_ON = {'pvt': {}, 'swin': {'AMP_ENABLE': True}, 'cvt': {'AMP.ENABLED': True}}
DIST_EVAL = {'pvt': ({'--dist-eval': True}, 'main.py --eval --dist-eval'),
             'swin': ({'TEST.SEQUENTIAL': False}, 'main.py --eval (sharded: TEST.SEQUENTIAL False)'),
             'cvt': ({}, 'run.sh -t test')}
LATEST = {'pvt': 'checkpoint.pth', 'swin': 'ckpt.pth', 'cvt': 'checkpoint.pth'}  # the resumable checkpoint
NEXT_EPOCH_STORED = {'pvt': False, 'swin': False, 'cvt': True}  # CvT stores the next epoch, the others the last


def run_logged(backbone, job, log):
    """launch.run, and the run's console output (its log file)."""
    result = launch.run(backbone, job, log=log, timeout=300)
    with open(log) as f:
        return result, f.read()


def scaler_text(state):
    return f'scale {state.get("scale")}, growth tracker {state.get("_growth_tracker")}' if state else 'none'


def train_backbone(report, backbone, device, quick, data, workdir, images, rebuild):
    """Train, resume and evaluate `backbone`'s first CIFAR ISTA2 config with a bank (eval_align='bank': the banks
    are filled while training, under AMP on CUDA, and evaluation aligns against them); with `rebuild`, also
    rebuild its banks from the training images and evaluate with those. images: (train, val) counts."""
    part, title = 'trainers', BACKBONES[backbone].title
    cuda = device.type == 'cuda'
    no_amp = 'AMP and the grad scaler are CUDA-only in the trainers (common/trainer.py)'
    batch = 4 if quick else 32
    config = next(iter(BACKBONES[backbone].cifar.values())).bank
    train_images, val_images = images
    folder = os.path.join(workdir, backbone)
    os.makedirs(folder, exist_ok=True)
    job = launch.Job(config, data, os.path.join(folder, 'train'), epochs=2, warmup_epochs=0, batch_size=batch,
                     seed=0, workers=0 if quick else 2, extra=AMP_ON[backbone])
    steps = [f'train 2 epochs{", AMP fp16" if cuda else " (fp32: no CUDA)"}',
             'process group (NCCL on CUDA, even for one process)', 'grad scaler saved, past its initial state',
             'auto-resume (rerun with 3 epochs)', 'grad scaler state survives the resume',
             f'evaluate with the banks: {DIST_EVAL[backbone][1]}'] + (
                 ['rebuild the banks from the training images, evaluate with them'] if rebuild else [])
    done, log = [], {'path': ''}  # the steps reported so far; the log of the run in progress

    def logged(name):
        log['path'] = os.path.join(folder, name)
        return log['path']

    def add(ok, measured='', target='', note=''):
        report.add(part, f'{title}: {steps[len(done)]}', ok, measured, target, note)
        done.append(ok)

    def skip(why, measured='', target=''):
        report.skip(part, f'{title}: {steps[len(done)]}', why, measured, target)
        done.append('SKIP')

    try:
        start = time.time()
        trained, _ = run_logged(backbone, job, logged('train.log'))
        loss, acc = trained['train']['loss'], trained['test']['acc1']
        add(trained['epochs'] == 2 and math.isfinite(loss) and math.isfinite(acc),
            f'loss {loss:.3f}, top-1 {acc:.1f}%, {time.time() - start:.0f} s', 'finite, 2 epochs',
            f'{config}, batch {batch}')
        if cuda:
            add(trained['process_group'] == 'nccl', str(trained['process_group']), 'nccl')
        else:
            skip('a CPU run joins no group with one process (gloo joins with two or more)', 'none')
        latest = os.path.join(os.path.dirname(trained['weights']), LATEST[backbone])
        saved = checkpoint.load(latest)
        scaler = saved.get('scaler') or {}
        past_start = bool(scaler) and any(scaler.get(k) != v for k, v in DEFAULT_SCALER.items())
        if cuda:
            add(past_start, scaler_text(scaler), f'!= {scaler_text(DEFAULT_SCALER)}', os.path.basename(latest))
        else:
            skip(f'{no_amp}; the checkpoint holds {scaler or "{}"}', scaler_text(scaler))

        probe = os.path.join(folder, 'scaler_probe.json')
        env = {'ISTA2_SCALER_PROBE': probe,
               'PYTHONPATH': os.pathsep.join(filter(None, [PROBE_SITE, os.environ.get('PYTHONPATH')]))}
        with settings_env(env):
            resumed, output = run_logged(backbone, replace(job, epochs=3), logged('resume.log'))
        after = checkpoint.load(latest)
        epoch = after['epoch'] - NEXT_EPOCH_STORED[backbone]
        add('Resumed from' in output and resumed['train'] is not None and epoch == 2,
            f'resumed, trained epoch {epoch}, loss {resumed["train"]["loss"]:.3f}', '"Resumed from", epoch 2',
            'auto-resume from the run folder')
        probed = {}
        if os.path.isfile(probe):
            with open(probe) as f:
                probed = json.load(f)
        if not probed.get('installed'):
            add(False, 'the scaler probe did not load in the trainer process', 'probe active',
                f'PYTHONPATH={env["PYTHONPATH"]}')
        elif cuda:
            start_state = probed['scaler'] or {}
            add(bool(start_state) and start_state == scaler, f'starts from {scaler_text(start_state)}',
                f'= checkpoint: {scaler_text(scaler)}')
        else:
            skip(f'{no_amp}; the probe ran in the resumed process and saw no enabled scaler'
                 if probed.get('scaler') is None else f'{no_amp}, yet the probe saw one: {probed["scaler"]}')

        flags, _ = DIST_EVAL[backbone]
        evaluation = replace(job, evaluate=True, checkpoint=resumed['weights'], output=os.path.join(folder, 'eval'),
                             epochs=None, warmup_epochs=None, extra={**AMP_ON[backbone], **flags})
        evaluated, _ = run_logged(backbone, evaluation, logged('eval.log'))
        queued = banks_queued(resumed['weights'])
        add(evaluated['images'] == val_images and math.isfinite(evaluated['acc1']) and queued > 0,
            f'top-1 {evaluated["acc1"]:.1f}% on {evaluated["images"]} images; banks: {queued} rows queued',
            f'{val_images} images, finite; banks filled', os.path.basename(resumed['weights']))
        if rebuild:
            rebuilt, _ = run_logged(backbone, launch.Job(config, data, os.path.join(folder, 'bank'), rebuild_bank=True,
                                                         checkpoint=resumed['weights'], batch_size=batch, seed=0,
                                                         workers=job.workers, extra=AMP_ON[backbone]),
                                    logged('rebuild.log'))
            again, _ = run_logged(backbone, replace(evaluation, checkpoint=rebuilt['checkpoint'],
                                                    output=os.path.join(folder, 'eval-rebuilt')),
                                  logged('eval-rebuilt.log'))
            add(rebuilt['images'] == train_images and again['images'] == val_images and math.isfinite(again['acc1']),
                f'rebuilt from {rebuilt["images"]} images; top-1 {again["acc1"]:.1f}% on {again["images"]}',
                f'{train_images} images, then {val_images}, finite', os.path.basename(rebuilt['checkpoint']))
    except Exception as error:  # a failed launch names its command and log; the later steps cannot run
        traceback.print_exc()
        message = str(error).splitlines() or ['']
        why = next((m for m in message if 'exited' in m), message[0])  # a LaunchError's first line is the command
        add(False, type(error).__name__, '', why[:300] + (f'; log: {log["path"]}' if log['path'] else ''))
        for _ in steps[len(done):]:
            skip('an earlier step failed')


def banks_queued(weights):
    """How many representative rows the checkpoint's ISTA2 banks have queued, over all layers."""
    state = checkpoint.model_state(checkpoint.load(weights))
    return sum(int(v) for k, v in state.items() if k.endswith('.ista2.bank_count'))


@contextlib.contextmanager
def settings_env(values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def part_trainers(report, device, quick, backbones, workdir):
    per_class = (4, 2) if quick else (32, 8)
    data = generate(os.path.join(workdir, 'data'), *per_class, size=32)
    for i, backbone in enumerate(backbones):  # the first also rebuilds its banks
        train_backbone(report, backbone, device, quick, data, workdir, [n * len(CLASSES) for n in per_class], i == 0)


# ---------------------------------------------------------------------------------------------- 4. speed

def timed(build, batch, size, num_classes, device, amp, warmup, steps):
    """Build a model (after freeing the last one: each model's peak memory is its own) and time its train step
    (measure.TrainStep: the median of `steps` steps after `warmup` and the grad scaler's settling; peak memory
    from then on); then count what one forward of the step saves for backward ('saved_mib')."""
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    step = TrainStep(build(), batch, size, num_classes, device, amp)
    result = step.measure(warmup, steps)
    result['saved_mib'] = sum(s.nbytes for s in step.saved().values()) / 2 ** 20
    del step
    gc.collect()
    return result


@dataclass
class SpeedSetting:
    batch: int
    size: int
    amp: bool
    warmup: int
    steps: int
    quick: bool

    def describe(self, batch=None, size=None):
        precision = 'fp16 AMP + grad scaler' if self.amp else 'fp32'
        return (f'batch {batch or self.batch}, {precision}, {size or self.size} px, median of {self.steps} steps '
                f'after {self.warmup}')

    def targets_apply(self, device):
        return device.type == 'cuda' and not self.quick and self.amp and self.size == 224 and self.batch == 128


WHY_NOT = 'the targets are for batch 128, fp16 AMP, 224 px on a GPU'


def ratio_line(report, part, check, ratio, target, applies, measured):
    if applies:
        report.add(part, check, ratio <= target, measured, f'<= {target:.2f}', asserted=False)
    else:
        report.skip(part, check, WHY_NOT, measured, f'<= {target:.2f}', asserted=False)


def speed_pairs(quick):
    """(row, backbone, baseline config, ISTA2 config): the paper's four pairs; quick: each backbone's first CIFAR
    pair."""
    if quick:
        return [(f'{row} (CIFAR config)', backbone, configs.baseline, configs.ista2)
                for backbone, entry in BACKBONES.items() for row, configs in list(entry.cifar.items())[:1]]
    return [(row, backbone, *pair) for backbone, entry in BACKBONES.items() for row, pair in entry.paper.items()]


def part_speed(report, device, setting):
    part = 'speed'
    size, classes = (32, 10) if setting.quick else (setting.size, 1000)
    for row, backbone, baseline, ista2 in speed_pairs(setting.quick):
        results = {}
        for config in (baseline, ista2):
            progress(f'speed: {config_name(config)}')
            build = functools.partial(BACKBONES[backbone].build, config, classes)
            results[config] = timed(build, setting.batch, size, classes, device, setting.amp, setting.warmup,
                                    setting.steps)
        base, ours = results[baseline], results[ista2]
        ratio = ours['seconds'] / base['seconds']
        ratio_line(report, part, f'{row}: train step ISTA2/baseline', ratio, TIME_RATIO, setting.targets_apply(device),
                   f'{ratio:.3f} ({1e3 * ours["seconds"]:.1f} / {1e3 * base["seconds"]:.1f} ms; '
                   f'{setting.batch / ours["seconds"]:.0f} / {setting.batch / base["seconds"]:.0f} img/s)')
        if device.type == 'cuda':
            mem = ours['peak_mib'] / base['peak_mib']
            ratio_line(report, part, f'{row}: peak GPU memory ISTA2/baseline', mem, MEMORY_RATIO,
                       setting.targets_apply(device),
                       f'{mem:.3f} ({ours["peak_mib"] / 1024:.2f} / {base["peak_mib"] / 1024:.2f} GiB)')
        else:
            report.skip(part, f'{row}: peak GPU memory ISTA2/baseline', 'peak GPU memory is measured on CUDA only',
                        '', f'<= {MEMORY_RATIO:.2f}', asserted=False)
        saved = ours['saved_mib'] / base['saved_mib']
        ratio_line(report, part, f'{row}: saved for backward ISTA2/baseline', saved, SAVED_RATIO,
                   setting.targets_apply(device),
                   f'{saved:.3f} ({ours["saved_mib"]:.1f} / {base["saved_mib"]:.1f} MiB)')


# ---------------------------------------------------------------------------------------------- 5. timm

# (backbone, row of its paper pairs, timm model, timm module holding checkpoint_filter_fn, config -> drop-path rate)
TIMM_PAIRS = [('pvt', 'PVTv2-B0', 'pvt_v2_b0', 'pvt_v2', lambda cfg: cfg['drop_path']),
              ('pvt', 'PVTv2-B2', 'pvt_v2_b2', 'pvt_v2', lambda cfg: cfg['drop_path']),
              ('swin', 'Swin-T', 'swin_tiny_patch4_window7_224', 'swin_transformer',
               lambda cfg: cfg.MODEL.DROP_PATH_RATE)]
TIMM_BATCH_QUICK = 2  # and only the first pair is timed


def timm_pair(backbone, row, timm_name, timm_module, drop_path):
    """Our baseline (built from its paper config) and timm's model holding its weights, fp32 CPU, eval mode."""
    import timm
    entry = BACKBONES[backbone]
    config = entry.paper[row][0]
    torch.manual_seed(0)
    ours = entry.build(config).eval()
    theirs = timm.create_model(timm_name, drop_path_rate=drop_path(entry.load(entry.path(config)))).eval()
    filter_fn = importlib.import_module(f'timm.models.{timm_module}').checkpoint_filter_fn
    theirs.load_state_dict(filter_fn(ours.state_dict(), theirs))  # strict: every key maps
    return {'ours': ours, 'timm': theirs}


def timm_model(spec, which):
    return timm_pair(*spec)[which]


def part_timm(report, device, setting):
    part = 'timm'
    batch = setting.batch if not setting.quick else TIMM_BATCH_QUICK
    for i, spec in enumerate(TIMM_PAIRS):
        backbone, row, timm_name = spec[:3]
        models = timm_pair(*spec)
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad(), no_tf32():
            a, b = (models[k].to(device)(x) for k in ('ours', 'timm'))
        err = rel_error(a, b)
        report.add(part, f'{row} = timm {timm_name}, same weights', err <= TIMM_TOL and finite(a, b), f'{err:.1e}',
                   f'<= {TIMM_TOL:.0e}', 'fp32 eval, TF32 off, batch 2, 224 px')
        del models, a, b
        if setting.quick and i > 0:
            report.skip(part, f'{row}: train step ours/timm', 'quick mode times the first pair only', '',
                        f'<= {TIMM_RATIO:.2f}', asserted=False)
            continue
        measured = {}
        for which in ('ours', 'timm'):
            progress(f'timm: timing {which} {timm_name}')
            build = functools.partial(timm_model, spec, which)
            measured[which] = timed(build, batch, 224, 1000, device, setting.amp, setting.warmup, setting.steps)
        ours, theirs = measured['ours'], measured['timm']
        memory = (f'; {ours["peak_mib"] / 1024:.2f} / {theirs["peak_mib"] / 1024:.2f} GiB'
                  if device.type == 'cuda' else '')
        ratio = ours['seconds'] / theirs['seconds']
        ratio_line(report, part, f'{row}: train step ours/timm', ratio, TIMM_RATIO, setting.targets_apply(device),
                   f'{ratio:.3f} ({1e3 * ours["seconds"]:.1f} / {1e3 * theirs["seconds"]:.1f} ms{memory})')


# ---------------------------------------------------------------------------------------------- the run

TITLES = {'preflight': 'Preflight: what the GPU paths need',
          'ista2': 'ISTA2 on {device} against the CPU float64 reference at the winners the device chose (per tensor: '
                   'fp32 max |error| / max |reference|, autocast rms error / rms reference)',
          'trainers': 'Trainers through their real launchers, --nproc_per_node 1, generated 32 px data',
          'speed': 'Speed, ISTA2 against baseline, train step: {speed} (* targets reported, not asserted)',
          'timm': 'Our baselines against timm\'s models; train step: {timm} (* targets reported, not asserted)'}

# Seconds a unit of work takes on one H100/H200, from which --budget estimates each part before running it. They
# are estimates until a GPU run measures them: the report prints each part's estimate beside its time.
COST = {'triton_compile': 1.5,  # one Triton kernel specialisation (0.2-6.5 s on sm_90)
        'case': 0.5,  # one ISTA2 case, forward and backward, and its CPU float64 reference at the device's winners
        'launch': 15.,  # one trainer launch on generated 32 px data: process start, CUDA, 2-3 short epochs
        'model': 10.}  # build one model, warm it up and time its train step at batch 128


def estimate(part, args):
    """Expected seconds of `part` (full mode on one H100/H200), counted in units of COST."""
    if part == 'preflight':
        return 4 * COST['triton_compile'] + 5
    if part == 'ista2':  # every case (and the patched timm model) on two code paths in three precisions
        cases = SMALL_CASES + stage_cases(args.quick)
        return ((len(cases) + 1) * len(PRECISIONS) * 2 * COST['case']
                + len(PRECISIONS) * len(triton_kernels(cases)) * COST['triton_compile'])
    if part == 'trainers':  # train, resume, evaluate; the first backbone also rebuilds its banks and evaluates again
        return (3 * len(args.backbones) + 2) * COST['launch']
    if part == 'speed':
        return 2 * len(speed_pairs(args.quick)) * COST['model']
    return 2 * len(TIMM_PAIRS) * COST['model']  # timm: ours and timm's, each pair


def triton_kernels(cases):
    """The Triton kernels the cases and the patched DeiT-Tiny compile per dtype, as (kernel, width, heads):
    RMSNorm forward and backward where q, k or v are RMS-normalised, top-1 alignment forward and backward."""
    kernels = {(name, 192, 3) for name in ('rms_norm', 'rms_norm_backward', 'align', 'align_backward')}  # DeiT-Tiny
    for case in cases:
        options = {**PUBLISHED, **case.options}
        if options.get('norm_type', 'rmsnorm') == 'rmsnorm':
            kernels |= {(name, case.dim, 1) for name in ('rms_norm', 'rms_norm_backward')}
        if options['attn_inter_topk'] == 1:
            kernels |= {(name, case.dim, case.heads) for name in ('align', 'align_backward')}
    return kernels


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', choices=['cuda', 'cpu'], default='cuda',
                        help='cuda (default; an error without one) or cpu (with --quick: the CI smoke mode)')
    parser.add_argument('--quick', action='store_true', help='tiny sizes: every code path, no meaningful figures')
    parser.add_argument('--parts', nargs='+', choices=PARTS, default=list(PARTS),
                        help='in this order by default; the preflight always runs first')
    parser.add_argument('--backbones', nargs='+', choices=list(BACKBONES), default=list(BACKBONES),
                        help='the trainers to run (trainers part)')
    parser.add_argument('--batch', type=int, help='speed and timm parts: per-GPU batch (default 128; quick 2)')
    parser.add_argument('--warmup', type=int, help='untimed steps per model (default 5; quick 0)')
    parser.add_argument('--steps', type=int, help='timed steps per model (default 15; quick 1)')
    parser.add_argument('--budget', type=float,
                        help=f'seconds for the whole check (default {BUDGET_S} on CUDA, none with --quick or on '
                             f'the CPU): a part whose estimate does not fit in what is left is skipped, and one still '
                             f'running when it is spent is stopped')
    parser.add_argument('--workdir', help='data, runs and logs (default: a temporary folder, removed if all pass)')
    parser.add_argument('--json', help='also write the report (header, lines with whole tracebacks) to this file')
    parser.add_argument('--worker', help=argparse.SUPPRESS)  # run this one part in this process
    parser.add_argument('--lines', help=argparse.SUPPRESS)  # the worker's report lines, one JSON object each
    args = parser.parse_args(argv)
    if args.budget is not None and args.budget <= 0:
        parser.error(f'--budget must be a positive number of seconds, not {args.budget:g}')
    return args


def main(argv=None):
    """The command line: a worker runs its part; otherwise the whole check. Returns the exit status."""
    args = parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('gpu-check: no CUDA device is visible, and this check is for one. For the CPU smoke mode that the '
              'tests run: python benchmarks/gpu_check.py --device cpu --quick', file=sys.stderr)
        return 2
    if args.worker:
        return worker(args)
    return run(args)


def worker(args):
    """Run the part args.worker names in this process, each report line appended to args.lines as it is made."""
    device = torch.device(args.device)
    if args.device == 'cpu':
        from common.runtime import tune_cpu
        tune_cpu()
    else:
        torch.backends.cudnn.benchmark = True  # as common.trainer.setup sets it
    report = Report(sink=args.lines)
    try:
        run_part(report, args.worker, device, args)
    except Exception as error:
        report.add(args.worker, f'{args.worker} part', False, type(error).__name__, 'no exception',
                   str(error).partition('\n')[0][:300], traceback=traceback.format_exc())
    if report.header:
        report.write({'header': report.header})
    return 0


def run_part(report, part, device, args):
    """Part `part` in this process (the worker's body)."""
    setting = speed_setting(args, device)
    if part == 'preflight':
        part_preflight(report, device)
    elif part == 'ista2':
        part_ista2(report, device, args.quick)
    elif part == 'trainers':
        part_trainers(report, device, args.quick, args.backbones, args.workdir)
    elif part == 'speed':
        part_speed(report, device, setting)
    else:
        part_timm(report, device, setting)


def speed_setting(args, device):
    return SpeedSetting(batch=args.batch or (2 if args.quick else 128), size=224, amp=device.type == 'cuda',
                        warmup=args.warmup if args.warmup is not None else (0 if args.quick else 5),
                        steps=args.steps or (1 if args.quick else 15), quick=args.quick)


def worker_command(part, args, lines):
    """The command line of the process that runs `part`."""
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', part, '--lines', lines, '--device', args.device,
           '--backbones', *args.backbones, '--workdir', args.workdir]
    for flag in ('batch', 'warmup', 'steps'):
        if getattr(args, flag) is not None:
            cmd += [f'--{flag}', str(getattr(args, flag))]
    return cmd + (['--quick'] if args.quick else [])


def spawn(report, part, args, timeout):
    """Run `part` in a process of its own (a crash, a hang or a lost CUDA context stays there), its output shown
    and kept in the workdir; its lines join `report`. A process that exits with an error, or runs past `timeout`
    seconds (its whole process group is then stopped), is a FAIL line holding the end of its output."""
    lines, log = os.path.join(args.workdir, f'{part}.lines.jsonl'), os.path.join(args.workdir, f'{part}.log')
    with contextlib.suppress(FileNotFoundError):
        os.remove(lines)
    proc = subprocess.Popen(worker_command(part, args, lines), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    stopped = []

    def stop():
        stopped.append(True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, stop) if timeout is not None else None
    if timer:
        timer.start()
    tail = collections.deque(maxlen=60)
    try:
        with open(log, 'w') as out:
            for text in proc.stdout:
                out.write(text)
                sys.stderr.write(text)
                tail.append(text)
        status = proc.wait()
    except BaseException:  # Ctrl-C included: the part's processes, in a session of their own, must not outlive it
        stop()
        proc.wait()
        raise
    finally:
        if timer:
            timer.cancel()
    if os.path.isfile(lines):
        with open(lines) as f:
            for record in map(json.loads, f):
                if 'header' in record:
                    report.header = record['header']
                else:
                    report.lines.append(Line(**record))
    if stopped or status:
        why = (f'stopped after {timeout:.0f} s, when the budget was spent' if stopped
               else f'its process exited with status {status}' + (f' (signal {-status})' if status < 0 else ''))
        report.add(part, f'{part} part', False, 'crashed' if not stopped else 'over its time', 'runs to its end',
                   f'{why}; later checks of this part did not run; its output: {log}', traceback=''.join(tail))


def run(args):
    """The preflight, then each part args.parts names, in its own process and within the budget; print the report
    and return the exit status (1: a correctness check failed or a part crashed)."""
    device = torch.device(args.device)
    setting = speed_setting(args, device)
    keep = args.workdir is not None
    args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix='gpu-check-'))
    os.makedirs(args.workdir, exist_ok=True)
    budget = args.budget if args.budget is not None else (
        BUDGET_S if device.type == 'cuda' and not args.quick else None)
    report, begin = Report(), time.time()
    for part in ('preflight', *(p for p in PARTS if p in args.parts)):
        report.titles[part] = TITLES[part].format(
            device=device.type, speed=setting.describe(size=32 if args.quick else None),
            timm=setting.describe(batch=TIMM_BATCH_QUICK if args.quick else None))
        report.estimates[part] = estimate(part, args)
        left = None if budget is None else budget - (time.time() - begin)
        if left is not None and part != 'preflight' and report.estimates[part] > left:  # the preflight always runs
            report.skip(part, f'{part} part', f'over the budget: needs about {report.estimates[part]:.0f} s, '
                        f'{max(left, 0):.0f} s left of --budget {budget:g}; run it with --parts {part}')
            continue
        progress(f'{part} ...')
        start = time.time()
        spawn(report, part, args, None if left is None else max(left, 1))
        report.seconds[part] = time.time() - start
    total = time.time() - begin
    mode = 'quick mode' if args.quick else 'full mode'
    header = (f'gpu-check on {report.header or device.type}; {mode}; {total:.0f} s in all'
              + (f' (budget {budget:g} s: {"met" if total <= budget else "MISSED"})' if budget is not None else ''))
    print('\n' + report.text(header), flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'header': header, 'seconds': report.seconds, 'estimates': report.estimates,
                       'lines': [asdict(x) for x in report.lines]}, f, indent=1)
    if report.failed():
        print(f'gpu-check: runs, logs and whole tracebacks kept in {args.workdir}', flush=True)
    elif not keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return report.exit_status()


if __name__ == '__main__':
    sys.exit(main())
