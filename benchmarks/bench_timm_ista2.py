"""Train-step time of timm models patched with ISTA2 (published settings) against the same models unpatched.

    python benchmarks/bench_timm_ista2.py [--models deit_tiny_patch16_224 vit_small_patch16_224] [--batch 16]
                                          [--size 224] [--repeats 4] [--rounds 3]

A step is forward, cross-entropy, backward and an AdamW update (measure.TrainStep: fp32 on the CPU; on a GPU, when
there is one, fp16 autocast with a grad scaler, as the trainers run). The ISTA2 model is
timm.create_model('<name>_ista2'): patch_timm with qk_norm, v_norm, ista2_method='v', attn_inter_topk=1,
rep_tkn_type='mean'. Each round is a fresh process that builds both models and alternates their steps (after
one warm-up step each, and the grad scaler's settling), so that a machine shared with other work slows both
alike; the ratio printed is the median, over all rounds, of each ISTA2 step's time over the time of the baseline
step before it.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from common.runtime import tune_cpu  # noqa: E402

from measure import TrainStep, add_step_args, device_name  # noqa: E402

TARGET = 1.10  # the ratio the patched model should stay within


def worker(name, batch, size, repeats):
    """One round: [(baseline seconds, ISTA2 seconds)] for `repeats` alternating steps, printed as JSON."""
    import timm

    import common.timm_ista2  # noqa: F401  (registers the <name>_ista2 models)
    tune_cpu()  # as the trainers do, before any parallel op
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    steps = []
    for variant in (name, f'{name}_ista2'):
        torch.manual_seed(0)
        model = timm.create_model(variant, img_size=size)
        steps.append(TrainStep(model, batch, size, model.num_classes, device))
    for step in steps:
        step.warm_up(1)
    pairs = [[step() for step in steps] for _ in range(repeats)]
    print(json.dumps(pairs))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['deit_tiny_patch16_224', 'vit_small_patch16_224'],
                        help='timm names with a registered <name>_ista2 (see common.timm_ista2.REGISTERED)')
    add_step_args(parser, repeats=4)
    args = parser.parse_args()
    if args.worker:
        name, batch, size, repeats = args.worker
        return worker(name, int(batch), int(size), int(repeats))
    print(f'torch {torch.__version__}, {device_name()}; batch {args.batch} at {args.size}px, '
          f'train step (fwd+bwd+AdamW); '
          f'{args.rounds} processes x {args.repeats} alternating steps per model')
    print(f'{"model":30} {"base ms":>9} {"ista2 ms":>9} {"ratio":>7} {"min ratio":>9}')
    for name in args.models:
        pairs = []
        for _ in range(args.rounds):
            cmd = [sys.executable, __file__, '--worker', name, str(args.batch), str(args.size), str(args.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            pairs += json.loads(out.strip().splitlines()[-1])
        base, ista2 = [p[0] for p in pairs], [p[1] for p in pairs]
        ratio = statistics.median(b / a for a, b in pairs)
        print(f'{name:30} {1e3 * statistics.median(base):9.1f} {1e3 * statistics.median(ista2):9.1f} {ratio:7.3f} '
              f'{min(ista2) / min(base):9.3f}  ({"within" if ratio <= TARGET else "ABOVE"} the {TARGET:.2f} target)')


if __name__ == '__main__':
    main()
