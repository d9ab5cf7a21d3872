"""Activation memory of whole models, baseline against ISTA2 on each of its code paths, each built from its config.

    python benchmarks/bench_memory.py [--pairs pvt_v2_b0 ...] [--paths fused torch] [--batch 4] [--size 224]
                                      [--rounds 1] [--explain]

saved MiB: what one training forward keeps for backward (measure.saved_for_backward: every storage a saved tensor
lies in, once and whole, parameters left out), deterministic. peak MiB: of a train step (measure.TrainStep: forward,
cross-entropy, backward, AdamW; fp32 on the CPU, fp16 autocast with a grad scaler on a GPU), in a fresh process:
on the CPU the peak resident memory above the process's footprint, on a GPU the largest allocation after the
warm-up; the largest over --rounds processes per variant (on the CPU it varies by a few percent between processes).
ISTA2's code paths: `fused` (the C++ kernels on the CPU, Triton on CUDA) and `torch` (its torch code, as with
ISTA2_CPU_KERNELS=0 ISTA2_TRITON=0). A baseline runs no ISTA2 code and is measured once. Every variant runs in its
own process. --explain then lists (computed in this process), per pair and path, what ISTA2 saves beyond its
baseline, by the slots that hold it ('<grad_fn>.<saved attribute>'; a custom Function's saved tensors by index).
"""
import argparse
import collections
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_train_step import CONFIGS, PAIRS  # noqa: E402

from common import ista2  # noqa: E402
from common.backbones import BACKBONES  # noqa: E402
from common.runtime import tune_cpu  # noqa: E402

from measure import TrainStep, add_step_args, compare, device_name, report  # noqa: E402

PATHS = ('fused', 'torch')
MIB = 2 ** 20


def build(name, path, batch, size):
    """A seeded train step of model `name`, ISTA2 on `path` (set by its module flags: the environment's are read on
    import)."""
    ista2.CPU_KERNELS = ista2.TRITON = path == 'fused'
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if ista2.CPU_KERNELS and device.type == 'cpu':  # loaded now, their code (~18 MiB) is footprint, not peak
        ista2._load_cpu_kernels()
    torch.manual_seed(0)
    backbone, config = CONFIGS[name]
    return TrainStep(BACKBONES[backbone].build(config), batch, size, 1000, device)


def worker(variant, batch, size, repeats):
    tune_cpu()  # as the trainers do, before any parallel op
    step = build(*variant.split('@'), batch, size)
    result = step.measure(1, repeats)
    result['saved_mib'] = sum(s.nbytes for s in step.saved().values()) / MIB
    report(result)


def by_slots(saved):
    """{slots that hold a storage, joined: [MiB, storages, 'shape dtype' of the largest]} of `saved_for_backward`'s
    storages."""
    groups = collections.defaultdict(lambda: [0., 0, ''])
    for s in sorted(saved.values(), key=lambda s: s.nbytes):
        group = groups[' & '.join(sorted(s.slots)) or '(unseen in the graph)']
        group[0] += s.nbytes / MIB
        group[1] += 1
        group[2] = f'{s.shape} {str(s.dtype).removeprefix("torch.")}'
    return groups


def explain(baseline, paths, batch, size):
    """Print what ISTA2 saves beyond `baseline` on each of `paths`: the groups of `by_slots` whose size differs,
    largest difference first."""
    base, empty = by_slots(build(baseline, 'fused', batch, size).saved()), [0., 0, '']
    for path in paths:
        ours = by_slots(build(PAIRS[baseline], path, batch, size).saved())
        print(f'\n{PAIRS[baseline]} ({path}) against {baseline}: saved MiB (storages) by the slots that hold them')
        print(f'{"+MiB":>8} {"baseline":>14} {"ISTA2":>14}  slots: largest storage')
        for key in sorted(base.keys() | ours.keys(), key=lambda k: -abs(ours.get(k, empty)[0] - base.get(k, empty)[0])):
            (b, nb, shape_b), (o, no, shape_o) = base.get(key, empty), ours.get(key, empty)
            if nb != no or abs(o - b) > 1e-6:
                print(f'{o - b:+8.2f} {b:8.2f} ({nb:3}) {o:8.2f} ({no:3})  {key}: {shape_o or shape_b}')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--pairs', nargs='+', default=list(PAIRS), choices=list(PAIRS), help='baseline names')
    parser.add_argument('--paths', nargs='+', default=list(PATHS), choices=PATHS, help="ISTA2's code paths")
    parser.add_argument('--explain', action='store_true', help='list what ISTA2 saves beyond its baseline')
    add_step_args(parser, repeats=1)
    parser.set_defaults(batch=4, rounds=1)
    args = parser.parse_args()
    if args.worker:
        variant, batch, size, repeats = args.worker
        return worker(variant, int(batch), int(size), int(repeats))
    print(f'torch {torch.__version__}, {device_name()}; batch {args.batch} at {args.size}px; saved for backward in '
          f'one training forward; peak of a train step (fwd+bwd+AdamW) after 1 warm-up step, the largest over '
          f'{args.rounds} process(es) per variant')
    print(f'{"model":36} {"path":5} {"saved MiB":>9} {"saved x":>7} {"peak MiB":>9} {"peak x":>7}')
    for baseline in args.pairs:
        variants = (f'{baseline}@fused', *(f'{PAIRS[baseline]}@{path}' for path in args.paths))
        results = compare(__file__, variants, (args.batch, args.size, args.repeats), args.rounds)
        base = results[variants[0]]
        for variant, r in results.items():
            name, path = variant.split('@')
            print(f'{name:36} {path if name != baseline else "-":5} {r["saved_mib"]:9.1f} '
                  f'{r["saved_mib"] / base["saved_mib"]:7.3f} {r["peak_mib"]:9.1f} '
                  f'{r["peak_mib"] / base["peak_mib"]:7.3f}')
    for baseline in args.pairs if args.explain else ():
        explain(baseline, args.paths, args.batch, args.size)


if __name__ == '__main__':
    main()
