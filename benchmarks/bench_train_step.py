"""Train-step time and peak memory of whole models, baseline against ISTA2, each built from its config file.

    python benchmarks/bench_train_step.py [--pairs pvt_v2_b0 pvt_v2_b2] [--batch 16] [--size 224] [--repeats 5]

A step is forward, cross-entropy, backward and an AdamW update (measure.TrainStep: fp32 on the CPU; on a GPU, when
there is one, fp16 autocast with a grad scaler, as the trainers run). Every variant runs in its own process.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common.backbones import BACKBONES, config_name  # noqa: E402
from common.runtime import tune_cpu  # noqa: E402

from measure import TrainStep, add_step_args, compare, device_name, report  # noqa: E402

# config name -> (backbone, config file) for the paper's models; baseline name -> ISTA2 name
CONFIGS = {config_name(config): (backbone, config) for backbone, entry in BACKBONES.items()
           for pair in entry.paper.values() for config in pair}
PAIRS = {config_name(baseline): config_name(ista2) for entry in BACKBONES.values()
         for baseline, ista2 in entry.paper.values()}


def worker(name, batch, size, repeats):
    tune_cpu()  # as the trainers do, before any parallel op
    torch.manual_seed(0)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    backbone, config = CONFIGS[name]
    report(TrainStep(BACKBONES[backbone].build(config), batch, size, 1000, device).measure(1, repeats))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--pairs', nargs='+', default=list(PAIRS), choices=list(PAIRS), help='baseline names')
    add_step_args(parser, repeats=5)
    args = parser.parse_args()
    if args.worker:
        name, batch, size, repeats = args.worker
        return worker(name, int(batch), int(size), int(repeats))
    print(f'torch {torch.__version__}, {device_name()}; batch {args.batch} at {args.size}px, '
          f'train step (fwd+bwd+AdamW), '
          f'median over {args.rounds} alternating processes of the median of {args.repeats} steps')
    print(f'{"model":36} {"step ms":>9} {"peak MiB":>9} {"time x":>7} {"mem x":>7}')
    for baseline in args.pairs:
        results = compare(__file__, (baseline, PAIRS[baseline]), (args.batch, args.size, args.repeats), args.rounds)
        base = results[baseline]
        for name, r in results.items():
            print(f'{name:36} {1e3 * r["seconds"]:9.1f} {r["peak_mib"]:9.1f} {r["seconds"] / base["seconds"]:7.2f} '
                  f'{r["peak_mib"] / base["peak_mib"]:7.2f}')


if __name__ == '__main__':
    main()
