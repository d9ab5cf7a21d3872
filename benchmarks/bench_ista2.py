"""Time and peak memory of one ISTA2 attention call (forward + backward) against the same
attention with alignment and norms off, on PVTv2-B2 stage-1 and Swin-T stage-1 shapes.

    python benchmarks/bench_ista2.py [--batch 32 128] [--reference /tmp/ref/ista2_ref.py] [--parts]
        [--device cuda] [--dtype bfloat16]

Each measurement runs in a fresh process, so the peak resident memory it reports (growth
above the process's footprint before the first step) belongs to that variant alone.
``--reference`` takes a scratch copy of the reference implementation's ``attns/ista2.py``
(kept outside this repository, its ``.cuda()`` calls pointed at the CPU); it is then timed
too, and its output compared with ours in float64. ``--parts`` also times the published
settings' two halves alone: the q/k/v RMSNorms, and the alignment.

ISTA2's code path follows the usual switches: ISTA2_CPU_KERNELS=0 times the torch path on the CPU,
ISTA2_TRITON=0 the torch path on CUDA. ``--device cuda`` synchronises after each call and reports the
peak allocated GPU memory; ``--dtype`` makes q, k, v (not the norm weights) that dtype, as under AMP.
"""
import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ista2  # noqa: E402
from common.ista2 import ISTA2  # noqa: E402
from common.runtime import tune_cpu  # noqa: E402

from measure import compare, report, time_step  # noqa: E402

NORMS = dict(qk_norm=True, v_norm=True)
ALIGNMENT = dict(ista2_method='v', attn_inter_topk=1, rep_tkn_type='mean')
PUBLISHED = {**NORMS, **ALIGNMENT}
SETTINGS = {'baseline': {}, 'norms-only': NORMS, 'alignment-only': ALIGNMENT, 'ista2': PUBLISHED}
# name: (dim, heads, query tokens, kv tokens, windows per image)
SHAPES = {'pvt_v2_b2.stage1': (64, 1, 3136, 49, 1), 'swin_t.stage1': (96, 3, 49, 49, 64)}


def load_reference(path):
    spec = importlib.util.spec_from_file_location('ista2_reference', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ISTA2


def build(variant, shape, reference=None):
    dim, heads, _, _, windows = shape
    kwargs = dict(qk_scale=(dim // heads) ** -0.5, v_scale=(dim // heads) ** -0.5, is_swin=windows > 1)
    cls = load_reference(reference) if variant.startswith('reference') else ISTA2
    return cls(dim, heads, **kwargs, **SETTINGS[variant.removeprefix('reference-')])


def inputs(shape, batch, dtype=torch.float32, seed=0):
    dim, heads, p1, p2, windows = shape
    g = torch.Generator().manual_seed(seed)
    rows = batch * windows
    q, k, v = (torch.randn(rows, p, dim, generator=g, dtype=dtype) for p in (p1, p2, p2))
    extra = {}
    if windows > 1:  # a shifted Swin block: relative-position bias and a shift mask
        extra = dict(real_b=batch, relative_position_bias=torch.randn(heads, p1, p2, generator=g, dtype=dtype),
                     mask=torch.where(torch.rand(windows, p1, p2, generator=g) < 0.3, -100., 0.).to(dtype))
    return q, k, v, extra


def worker(variant, shape_name, batch, repeats, reference, device='cpu', dtype='float32'):
    tune_cpu()  # as the trainers do, before any parallel op
    shape = SHAPES[shape_name]
    module = build(variant, shape, reference or None).to(device)
    q, k, v, extra = inputs(shape, batch)
    q, k, v = (t.to(device, getattr(torch, dtype)).requires_grad_() for t in (q, k, v))
    extra = {key: value.to(device, getattr(torch, dtype)) if torch.is_tensor(value) else value
             for key, value in extra.items()}
    cuda = device.startswith('cuda')

    def step():
        module(q, k, v, **extra).float().sum().backward()
        for t in (q, k, v):
            t.grad = None
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    result = time_step(step, repeats)
    if cuda:  # GPU memory instead of the process's resident memory
        result['peak_mib'] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    report(result)


def max_difference(shape_name, reference):
    """Largest |ours - reference| over the published settings, float64, small batch."""
    shape = SHAPES[shape_name]
    ours, theirs = build('ista2', shape).double(), build('reference-ista2', shape, reference).double()
    q, k, v, extra = inputs(shape, 4, torch.float64, seed=1)
    return (ours(q, k, v, **extra) - theirs(q, k, v, **extra)).abs().max().item()


def code_path(device, dtype):
    """Which implementation of the norms and the top-1 alignment ISTA2 picks for these tensors."""
    x = torch.empty(0, dtype=getattr(torch, dtype), device=device)
    if ista2._cpu_kernels(x) is not None:
        return 'the fused CPU kernels'
    return 'the Triton kernels' if ista2._triton_kernels(x) is not None else 'the torch code path'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, nargs='+', default=[32, 128])
    parser.add_argument('--repeats', type=int, default=5, help='timed calls per process')
    parser.add_argument('--rounds', type=int, default=3, help='processes per variant, alternating')
    parser.add_argument('--reference', help='scratch copy of the reference attns/ista2.py, CPU-patched')
    parser.add_argument('--parts', action='store_true', help='also time the norms alone and the alignment alone')
    parser.add_argument('--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'],
                        help='of q, k, v (the norm weights stay float32, as under AMP)')
    parser.add_argument('--worker', nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, shape_name, batch, repeats, reference, device, dtype = args.worker
        return worker(variant, shape_name, int(batch), int(repeats), reference, device, dtype)

    variants = ['baseline'] + (['norms-only', 'alignment-only'] if args.parts else []) + ['ista2']
    variants += ['reference-baseline', 'reference-ista2'] if args.reference else []
    device = args.device if args.device == 'cpu' else torch.cuda.get_device_name(args.device)
    print(f'torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {args.dtype}, '
          f'ISTA2 on {code_path(args.device, args.dtype)}, forward+backward, median over {args.rounds} '
          f'alternating processes of the median of {args.repeats} calls; ratios are to our baseline')
    print(f'{"shape":18} {"batch":>5} {"variant":18} {"ms":>9} {"peak MiB":>9} {"time x":>7} {"mem x":>7}')
    for shape_name in args.shapes:
        if args.reference:
            print(f'{shape_name}: max |ours - reference| (float64) = {max_difference(shape_name, args.reference):.2e}')
        for batch in args.batch:
            results = compare(__file__, variants, (shape_name, batch, args.repeats, args.reference or '',
                                                   args.device, args.dtype), args.rounds)
            base = results['baseline']
            for variant, r in results.items():
                print(f'{shape_name:18} {batch:5d} {variant:18} {1e3 * r["seconds"]:9.1f} {r["peak_mib"]:9.1f} '
                      f'{r["seconds"] / base["seconds"]:7.2f} {r["peak_mib"] / max(base["peak_mib"], 1e-9):7.2f}')


if __name__ == '__main__':
    main()
