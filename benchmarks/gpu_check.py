"""`make gpu-check`: every CUDA-specific path in one command, and one report.

    python benchmarks/gpu_check.py [--parts ista2 nccl trainers speed timm] [--backbones pvt swin cvt]
                                   [--batch 128] [--warmup 5] [--steps 15] [--workdir DIR] [--json FILE]
    python benchmarks/gpu_check.py --device cpu --quick      # the CPU smoke mode of tests/test_gpu_check.py

The parts, with what each should cost on one H100 (estimates: no GPU has been lent to the project yet; the
report prints the measured times, and the header the total against the 600 s budget):

1. ista2 (~1 min, mostly Triton compiling its kernels for three dtypes and a dozen shapes): ISTA2's forward
   and backward on the device, on each of its code paths there (the default one, with the Triton kernels
   on CUDA; and the torch path, common.ista2.TRITON off), against the CPU float64 oracle: the per-token
   loop of common/ista2_oracle.py on five small cases (every representative-token type, top-k > 1, bs_ratio,
   LayerNorm, Swin windows with shift mask and position bias), and the CPU float64 module (which the test
   suite checks against that loop) on stage shapes of PVTv2-B0, Swin-T and CvT-13 at 32 images. fp32 must
   match to fp32 tolerance (TF32 off); under fp16 and bf16 autocast (q, k, v handed over in the low dtype,
   as the models' linear layers do) outputs and gradients must be finite and close. The oracle is checked
   too (float64 module = loop, forward and backward; gradients = finite differences of the loop), and a
   kernel that failed to load (ISTA2 then warns and falls back to the torch path) is a failure.
2. nccl (~5 s): an NCCL process group of one process on the GPU: all_reduce, all_gather, broadcast, barrier.
3. trainers (~2.5 min: 9 launches of 10-20 s, mostly process start-up): each backbone's trainer through its
   real launcher (torchrun for PVT and Swin, run.sh for CvT, via common.launch) with --nproc_per_node 1 and
   AMP on, its CIFAR ISTA2 config on a generated 32 px dataset (320 training images, batch 32): train 2
   epochs; the checkpoint's grad-scaler state (common.checkpoint.load) must have moved from its initial one;
   rerun with 3 epochs: it must auto-resume from the run folder, and its first AMP step must start from the
   checkpoint's scaler state (read inside the trainer process by benchmarks/gpu_check_site/sitecustomize.py);
   evaluate the weights with PVT --dist-eval, Swin's sharded evaluation, CvT run.sh -t test. On CUDA a
   torchrun launch joins an NCCL group even alone (common/runtime.py), which each run's result reports;
   the multi-process paths (DDP, sharded samplers) need 2 or more GPUs.
4. speed (~1.5 min: 8 models x (build + 5 warm-up + 15 timed steps); a Swin-T step is ~0.3 s): the paper's
   four pairs at batch 128 per GPU, fp16 autocast with a grad scaler as the trainers run, 224 px: train
   step (forward, cross-entropy, backward, AdamW) ms, images/s, peak GPU memory, ISTA2/baseline ratios.
5. timm (~30 s; our models' times come from part 4): our PVTv2-B0, PVTv2-B2 and Swin-T baselines against
   timm's own pvt_v2_b0, pvt_v2_b2 and swin_tiny_patch4_window7_224 holding the same weights (through
   timm's checkpoint_filter_fn, as tests/test_pvt_model.py and tests/test_swin_model.py do): equal outputs
   in fp32 (TF32 off), and the train-step time in part 4's setting.

Every line of the report is PASS, FAIL or SKIP (with the reason) beside the measured figure and its target.
The exit status is 1 if a correctness check fails or a part crashes, 2 without a GPU (unless --device cpu);
the speed targets (ISTA2/baseline train step <= 1.05 and peak memory <= 1.10, ours/timm <= 1.00) are
marked * and printed, never asserted. It needs the repository and the packages of requirements.txt, nothing else:
no network, no dataset, no pretrained weights, not the test suite (on a lent GPU without network: the image's own
torch and the wheels of `make gpu-wheels`, see docs/reproduce.md). Logs and runs go to --workdir (a temporary folder,
kept if anything fails).

--quick (either device) keeps every code path at tiny sizes: stage shapes of 2 images, trainers at batch 4
on 40 images, the speed part on the registry's CIFAR pairs at 32 px and batch 2 for one step, the timm
timing for the first pair only; its speed targets are SKIPped (they are for batch 128, AMP, 224 px on a
GPU). On the CPU there is no NCCL (the same collectives run on gloo instead) and the trainers use neither
AMP nor a grad scaler: those checks are SKIPs that say so.
"""
import argparse
import contextlib
import copy
import functools
import gc
import importlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from common import checkpoint, launch  # noqa: E402
from common import ista2 as ista2_module  # noqa: E402
from common.backbones import BACKBONES, config_name  # noqa: E402
from common.demo_data import CLASSES, generate  # noqa: E402
from common.ista2 import ISTA2  # noqa: E402
from common.ista2_oracle import naive_ista2  # noqa: E402

PROBE_SITE = os.path.join(ROOT, 'benchmarks', 'gpu_check_site')
PARTS = ('ista2', 'nccl', 'trainers', 'speed', 'timm')

# Targets: correctness tolerances (asserted) and speed targets (reported)
FP32_TOL = {'forward': 1e-5, 'backward': 1e-4}  # max |error| / max |oracle|, per tensor (rel_error 'max')
AMP_TOL = {torch.float16: 5e-2, torch.bfloat16: 1.5e-1}  # rms error / rms oracle, forward and backward ('rms')
FD_TOL = 1e-6  # float64 backward against finite differences of the per-token oracle (relative)
TIMM_TOL = 1e-4  # our baseline against timm's with the same weights, fp32, TF32 off (max error / max logit)
TIME_RATIO, MEMORY_RATIO, TIMM_RATIO = 1.05, 1.10, 1.00
BUDGET_S = 600
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


class Report:
    """The lines of every part, in order, and each part's title and wall time."""

    def __init__(self):
        self.lines, self.titles, self.seconds = [], {}, {}

    def add(self, part, check, ok, measured='', target='', note='', asserted=True):
        status = ok if isinstance(ok, str) else ('PASS' if ok else 'FAIL')
        self.lines.append(Line(part, check, status, measured, target, note, asserted))
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
            out += ['', f'{title} ({self.seconds.get(part, 0):.0f} s)']
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
    """Output and gradients (q, k, v and every parameter) of sum(out * g); dtype: autocast to it, with
    q, k and v handed over in it. Everything comes back as float64 on the CPU."""
    module = copy.deepcopy(module).float().to(device)
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
    return out.detach().double().cpu(), {n: t.detach().double().cpu() for n, t in grads.items()}


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def reference(case, oracle):
    """The float64 oracle's output and gradients (q, k, v and every parameter) for `case`. With the per-token
    loop (`oracle`): its output, and its own gradients where autograd can differentiate it (else the float64
    module's); and the largest of three relative errors: module against loop (forward; backward where the
    loop is differentiable), and those gradients against central differences of the loop along one random
    direction. Without it (stage shapes): the CPU float64 module's output and gradients, and None."""
    module, inputs, g = build_case(case)
    leaves = {n: inputs[n].clone().requires_grad_() for n in ('q', 'k', 'v')}
    wrt = {**leaves, **dict(module.named_parameters())}

    def grads_of(out):
        found = torch.autograd.grad((out * g).sum(), list(wrt.values()), allow_unused=True)
        return {n: (t if t is not None else torch.zeros_like(wrt[n])).detach() for n, t in zip(wrt, found, strict=True)}

    out = call(module, {**inputs, **leaves})
    grads = grads_of(out)
    if oracle is None:
        return module, inputs, g, out.detach(), grads, None

    def loop(x):
        return oracle(module, x['q'], x['k'], x['v'], case.images, rel_bias=x.get('relative_position_bias'),
                      mask=x.get('mask'))

    expected = loop({**inputs, **leaves})  # after the module's call: 'random' reuses the tokens it drew
    errors = [rel_error(out, expected)]
    if expected.requires_grad:  # a differentiable loop: its gradients are the reference
        loop_grads = grads_of(expected)
        errors.append(grads_error(grads, loop_grads, 'max'))
        grads = loop_grads
    gen = torch.Generator().manual_seed(1)
    direction = {n: torch.randn(inputs[n].shape, generator=gen, dtype=torch.float64) for n in case.fd_inputs}
    eps = 1e-6
    with torch.no_grad():
        plus = (loop({**inputs, **{n: inputs[n] + eps * u for n, u in direction.items()}}) * g).sum()
        minus = (loop({**inputs, **{n: inputs[n] - eps * u for n, u in direction.items()}}) * g).sum()
    numeric = float((plus - minus) / (2 * eps))
    analytic = float(sum((grads[n] * u).sum() for n, u in direction.items()))
    errors.append(abs(numeric - analytic) / max(abs(numeric), 1e-12))
    return module, inputs, g, expected.detach(), grads, max(errors)


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


def check_ista2(report, device, quick):
    part = 'ista2'
    with default_dtype(torch.float64):  # the loop makes its output tensor in the default dtype
        groups = {'small cases vs per-token loop': [(c, reference(c, naive_ista2)) for c in SMALL_CASES],
                  'stage shapes vs CPU float64 module': [(c, reference(c, None)) for c in stage_cases(quick)]}
    fd = max(ref[5] for _, ref in groups['small cases vs per-token loop'])
    report.add(part, 'float64 oracle: module = loop (fwd, bwd); bwd = finite differences of the loop', fd <= FD_TOL,
               f'{fd:.1e}', f'<= {FD_TOL:.0e}', 'CPU, float64')
    precisions = [(None, 'fp32'), (torch.float16, 'fp16 autocast'), (torch.bfloat16, 'bf16 autocast')]
    for path, flags in code_paths(device).items():
        with settings(ista2_module, **flags), no_tf32():
            for dtype, precision in precisions:
                for group, cases in groups.items():
                    worst = {'forward': (0., ''), 'backward': (0., '')}
                    bad = []
                    kind = 'max' if dtype is None else 'rms'
                    for case, (module, inputs, g, out_ref, grads_ref, _) in cases:
                        out, grads = forward_backward(module, inputs, g, device, dtype)
                        if not finite(out, *grads.values()):
                            bad.append(case.name)
                        errors = {'forward': rel_error(out, out_ref, kind),
                                  'backward': grads_error(grads, grads_ref, kind)}
                        for k, e in errors.items():
                            if not e <= worst[k][0]:
                                worst[k] = (e, case.name)
                    tol = FP32_TOL if dtype is None else dict.fromkeys(FP32_TOL, AMP_TOL[dtype])
                    ok = not bad and all(worst[k][0] <= tol[k] for k in worst)
                    measured = f'{kind} fwd {worst["forward"][0]:.1e}, bwd {worst["backward"][0]:.1e}'
                    target = (f'<= {tol["forward"]:g} / {tol["backward"]:g}' if dtype is None
                              else f'<= {tol["forward"]:g}, finite')
                    names = dict.fromkeys((worst['forward'][1], worst['backward'][1]))
                    note = (f'non-finite: {", ".join(bad)}; ' if bad else '') + 'worst: ' + ' / '.join(names)
                    report.add(part, f'{precision}, {path}, {group} ({len(cases)})', ok, measured, target, note)


def part_ista2(report, device, quick):
    """check_ista2, and a line saying whether ISTA2 fell back from its kernels (it warns once if it does)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        check_ista2(report, device, quick)
    fallbacks = [str(w.message).splitlines()[0] for w in caught if str(w.message).startswith('ISTA2:')]
    flag, kernels = ('TRITON', 'Triton') if device.type == 'cuda' else ('CPU_KERNELS', 'fused C++')
    check = f'ISTA2\'s {kernels} kernels loaded (no fallback warning)'
    if not getattr(ista2_module, flag, False):
        report.skip('ista2', check, f'common.ista2.{flag} is off or absent (ISTA2_{flag}=0?): only the torch path ran')
    else:
        report.add('ista2', check, not fallbacks, f'{len(fallbacks)} warnings', 'none', '; '.join(fallbacks)[:300])


# ---------------------------------------------------------------------------------------------- 2. NCCL

def part_nccl(report, device):
    import torch.distributed as dist
    part = 'nccl'
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
        report.add(part, 'NCCL process group of 1 process on the GPU', ok, measured, 'values unchanged')
    elif not ok:
        report.add(part, 'gloo stand-in for NCCL', False, measured, 'values unchanged')
    else:
        report.skip(part, 'NCCL process group', 'no CUDA device: NCCL needs a GPU; the same collectives ran on gloo',
                    measured)


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


def train_backbone(report, backbone, device, quick, data, workdir, val_images):
    part, title = 'trainers', BACKBONES[backbone].title
    cuda = device.type == 'cuda'
    no_amp = 'AMP and the grad scaler are CUDA-only in the trainers (common/trainer.py)'
    batch = 4 if quick else 32
    config = next(iter(BACKBONES[backbone].cifar.values())).ista2
    folder = os.path.join(workdir, backbone)
    os.makedirs(folder, exist_ok=True)
    job = launch.Job(config, data, os.path.join(folder, 'train'), epochs=2, warmup_epochs=0, batch_size=batch,
                     seed=0, workers=0 if quick else 2, extra=AMP_ON[backbone])
    steps = [f'train 2 epochs{", AMP fp16" if cuda else " (fp32: no CUDA)"}',
             'process group (NCCL on CUDA, even for one process)', 'grad scaler saved, past its initial state',
             'auto-resume (rerun with 3 epochs)', 'grad scaler state survives the resume',
             f'evaluate: {DIST_EVAL[backbone][1]}']
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
        add(evaluated['images'] == val_images and math.isfinite(evaluated['acc1']),
            f'top-1 {evaluated["acc1"]:.1f}% on {evaluated["images"]} images', f'{val_images} images, finite',
            os.path.basename(resumed['weights']))
    except Exception as error:  # a failed launch names its command and log; the later steps cannot run
        traceback.print_exc()
        message = str(error).splitlines() or ['']
        why = next((m for m in message if 'exited' in m), message[0])  # a LaunchError's first line is the command
        add(False, type(error).__name__, '', why[:300] + (f'; log: {log["path"]}' if log['path'] else ''))
        for _ in steps[len(done):]:
            skip('an earlier step failed')


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
    for backbone in backbones:
        train_backbone(report, backbone, device, quick, data, workdir, per_class[1] * len(CLASSES))


# ---------------------------------------------------------------------------------------------- 4. speed

def train_step_timing(model, batch, size, num_classes, device, amp, warmup, steps):
    """Median train step (s) of `model` on random images: forward and cross-entropy under fp16 autocast
    with a grad scaler when `amp`, as the trainers run on CUDA; backward; AdamW. Peak memory (MiB) on CUDA."""
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    gen = torch.Generator(device).manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=device, generator=gen)
    labels = torch.randint(0, num_classes, (batch,), device=device, generator=gen)

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = F.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for _ in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == 'cuda' else None
    return {'seconds': statistics.median(times[warmup:]), 'peak_mib': peak}


def timed(build, batch, size, num_classes, device, amp, warmup, steps):
    """Build a model (after freeing the last one), then time it: each model's peak memory is its own."""
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    result = train_step_timing(build(), batch, size, num_classes, device, amp, warmup, steps)
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


def part_speed(report, device, setting, timings):
    part = 'speed'
    size, classes = (32, 10) if setting.quick else (setting.size, 1000)
    for row, backbone, baseline, ista2 in speed_pairs(setting.quick):
        results = {}
        for config in (baseline, ista2):
            progress(f'speed: {config_name(config)}')
            build = functools.partial(BACKBONES[backbone].build, config, classes)
            results[config] = timings[config] = timed(build, setting.batch, size, classes, device, setting.amp,
                                                      setting.warmup, setting.steps)
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


def part_timm(report, device, setting, timings):
    part = 'timm'
    batch = setting.batch if not setting.quick else TIMM_BATCH_QUICK
    for i, spec in enumerate(TIMM_PAIRS):
        backbone, row, timm_name = spec[:3]
        config = BACKBONES[backbone].paper[row][0]
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
            cached = timings.get(config) if which == 'ours' and not setting.quick else None
            if cached is None:
                progress(f'timm: timing {which} {timm_name}')
                build = functools.partial(timm_model, spec, which)
                cached = timed(build, batch, 224, 1000, device, setting.amp, setting.warmup, setting.steps)
            measured[which] = cached
        ours, theirs = measured['ours'], measured['timm']
        memory = (f'; {ours["peak_mib"] / 1024:.2f} / {theirs["peak_mib"] / 1024:.2f} GiB'
                  if device.type == 'cuda' else '')
        ratio = ours['seconds'] / theirs['seconds']
        ratio_line(report, part, f'{row}: train step ours/timm', ratio, TIMM_RATIO, setting.targets_apply(device),
                   f'{ratio:.3f} ({1e3 * ours["seconds"]:.1f} / {1e3 * theirs["seconds"]:.1f} ms{memory})')


# ---------------------------------------------------------------------------------------------- the run

TITLES = {'ista2': 'ISTA2 on {device} against the CPU float64 oracle (error per tensor: fp32 max |error| / '
                   'max |oracle|, autocast rms error / rms oracle)',
          'nccl': 'NCCL',
          'trainers': 'Trainers through their real launchers, --nproc_per_node 1, generated 32 px data',
          'speed': 'Speed, ISTA2 against baseline, train step: {speed} (* targets reported, not asserted)',
          'timm': 'Our baselines against timm\'s models; train step: {timm} (* targets reported, not asserted)'}


def environment(device):
    import timm
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = 'none'
    return f'{name}; torch {torch.__version__}, timm {timm.__version__}, triton {triton_version}'


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', choices=['cuda', 'cpu'], default='cuda',
                        help='cuda (default; an error without one) or cpu (with --quick: the CI smoke mode)')
    parser.add_argument('--quick', action='store_true', help='tiny sizes: every code path, no meaningful figures')
    parser.add_argument('--parts', nargs='+', choices=PARTS, default=list(PARTS))
    parser.add_argument('--backbones', nargs='+', choices=list(BACKBONES), default=list(BACKBONES),
                        help='the trainers to run (trainers part)')
    parser.add_argument('--batch', type=int, help='speed and timm parts: per-GPU batch (default 128; quick 2)')
    parser.add_argument('--warmup', type=int, help='untimed steps per model (default 5; quick 0)')
    parser.add_argument('--steps', type=int, help='timed steps per model (default 15; quick 1)')
    parser.add_argument('--workdir', help='data, runs and logs (default: a temporary folder, removed if all pass)')
    parser.add_argument('--json', help='also write the report lines to this JSON file')
    return parser.parse_args(argv)


def main(argv=None):
    """The command line: the process-wide settings of the trainers, then `run`; returns the exit status."""
    args = parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('gpu-check: no CUDA device is visible, and this check is for one. For the CPU smoke mode that the '
              'tests run: python benchmarks/gpu_check.py --device cpu --quick', file=sys.stderr)
        return 2
    if args.device == 'cpu':
        from common.runtime import tune_cpu
        tune_cpu()
    else:
        torch.backends.cudnn.benchmark = True  # as common.trainer.setup sets it
    return run(args)


def run(args):
    """Run the parts `args` names, print the report, return the exit status (1: a correctness check failed)."""
    device = torch.device(args.device)
    setting = SpeedSetting(batch=args.batch or (2 if args.quick else 128), size=224, amp=device.type == 'cuda',
                           warmup=args.warmup if args.warmup is not None else (0 if args.quick else 5),
                           steps=args.steps or (1 if args.quick else 15), quick=args.quick)
    workdir = args.workdir or tempfile.mkdtemp(prefix='gpu-check-')
    os.makedirs(workdir, exist_ok=True)
    report, timings, begin = Report(), {}, time.time()
    runs = {'ista2': lambda: part_ista2(report, device, args.quick),
            'nccl': lambda: part_nccl(report, device),
            'trainers': lambda: part_trainers(report, device, args.quick, args.backbones, workdir),
            'speed': lambda: part_speed(report, device, setting, timings),
            'timm': lambda: part_timm(report, device, setting, timings)}
    for part in PARTS:
        if part not in args.parts:
            continue
        report.titles[part] = TITLES[part].format(
            device=device.type, speed=setting.describe(size=32 if args.quick else None),
            timm=setting.describe(batch=TIMM_BATCH_QUICK if args.quick else None))
        start = time.time()
        progress(f'{part} ...')
        try:
            runs[part]()
        except Exception as error:
            traceback.print_exc()
            report.add(part, f'{part} part', False, type(error).__name__, 'no exception',
                       str(error).splitlines()[0][:300] if str(error) else '')
        report.seconds[part] = time.time() - start
    total = time.time() - begin
    mode = 'quick mode' if args.quick else 'full mode'
    header = (f'gpu-check on {environment(device)}; {mode}; {total:.0f} s in all'
              + (f' (budget {BUDGET_S} s: {"met" if total <= BUDGET_S else "MISSED"})' if not args.quick else ''))
    print('\n' + report.text(header), flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'header': header, 'seconds': report.seconds, 'lines': [asdict(x) for x in report.lines]}, f,
                      indent=1)
    if report.failed():
        print(f'gpu-check: runs and logs kept in {workdir}', flush=True)
    elif not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return report.exit_status()


if __name__ == '__main__':
    sys.exit(main())
