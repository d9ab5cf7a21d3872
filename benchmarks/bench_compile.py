"""torch.compile and TorchScript against eager: train-step and evaluation times of whole models, baseline and ISTA2,
each built from its config file.

    python benchmarks/bench_compile.py [--pairs pvt_v2_b0] [--modes eager compiled scripted] [--batch 16] [--size 224]
                                       [--repeats 5] [--rounds 1]

`compiled` is torch.compile(model, fullgraph=True) with torch's default backend (inductor; static shapes);
`scripted` is torch.jit.script(model) (ISTA2 then runs its torch code path, without the fused kernels). A step
is measure.TrainStep's (forward, cross-entropy, backward, AdamW; fp32 on the CPU); evaluation is a forward pass
without gradients in eval mode (ISTA2's eval_align as its config sets it). `first s` is the first train step and
the first evaluation together: mostly compiling. Every variant runs in its own process.
"""
import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_train_step import CONFIGS, PAIRS  # noqa: E402

from common.backbones import BACKBONES  # noqa: E402
from common.runtime import tune_cpu  # noqa: E402

from measure import TrainStep, add_step_args, compare, device_name, report, synchronize  # noqa: E402

MODES = ('eager', 'compiled', 'scripted')


def evaluation_seconds(model, images, repeats):
    """(seconds of the first forward, median seconds of `repeats` more) in eval mode without gradients."""
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            synchronize(images.device)
            start = time.perf_counter()
            model(images)
            synchronize(images.device)
            times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def worker(variant, batch, size, repeats):
    name, mode = variant.split('@')
    tune_cpu()
    torch.manual_seed(0)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    backbone, config = CONFIGS[name]
    model = BACKBONES[backbone].build(config).to(device)
    if mode == 'compiled':
        model = torch.compile(model, fullgraph=True)
    elif mode == 'scripted':
        model = torch.jit.script(model)
    step = TrainStep(model, batch, size, 1000, device)
    first_step = step()
    train = statistics.median(step() for _ in range(repeats))
    first_eval, evaluation = evaluation_seconds(model, step.images, repeats)
    report({'seconds': train, 'eval': evaluation, 'first': first_step + first_eval})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--pairs', nargs='+', default=list(PAIRS), choices=list(PAIRS), help='baseline names')
    parser.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES,
                        help='ways to run each model (eager, the reference of the x columns, always runs)')
    add_step_args(parser, repeats=5)
    parser.set_defaults(rounds=1)
    args = parser.parse_args()
    if args.worker:
        variant, batch, size, repeats = args.worker
        return worker(variant, int(batch), int(size), int(repeats))
    print(f'torch {torch.__version__}, {device_name()}; batch {args.batch} at {args.size}px, '
          f'median of {args.repeats} train steps (fwd+bwd+AdamW) and evaluations, {args.rounds} round(s)')
    print(f'{"model":36} {"mode":9} {"first s":>8} {"step ms":>9} {"x eager":>8} {"eval ms":>9} {"x eager":>8}')
    for baseline in args.pairs:
        for name in (baseline, PAIRS[baseline]):
            modes = ['eager', *(mode for mode in args.modes if mode != 'eager')]
            variants = [f'{name}@{mode}' for mode in modes]
            results = compare(__file__, variants, (args.batch, args.size, args.repeats), args.rounds)
            eager = results[variants[0]]
            for variant, mode in zip(variants, modes, strict=True):
                r = results[variant]
                print(f'{name:36} {mode:9} {r["first"]:8.1f} {1e3 * r["seconds"]:9.1f} '
                      f'{eager["seconds"] / r["seconds"]:8.2f} {1e3 * r["eval"]:9.1f} {eager["eval"] / r["eval"]:8.2f}')


if __name__ == '__main__':
    main()
