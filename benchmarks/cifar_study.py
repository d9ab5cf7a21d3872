"""The CIFAR-10 study: does ISTA2 help, and does the gain survive batch-independent evaluation?

    python benchmarks/cifar_study.py --data /tmp/cifar10 [--backbones pvt swin cvt] [--seeds 0 1]
        [--epochs N] [--nproc 1] [--workdir /tmp/ista2-study]

For each backbone, its baseline/ISTA2 CIFAR-10 config pair (common/backbones.py) is trained through
the backbone's real launcher (common/launch.py), once per seed, and every trained model is
evaluated under each of the trainers' protocols (common/trainer.py PROTOCOLS): the reference one,
validation images in class order with the trainer's evaluation batch; the same images in one
shuffled order (seed 0); batch size 1, where ISTA2 has no other image to align with. Prints top-1
(mean and spread over seeds) from the runs' structured results.
"""
import argparse
import os
import statistics
import time

from common import launch
from common.backbones import BACKBONES, config_name
from common.trainer import PROTOCOLS

CONFIG_WARMUP_EPOCHS = 3  # what every CIFAR-10 config sets; capped below a shorter --epochs
EVAL_SEED = 0  # fixes the one shuffled order, the same for every model


def train_and_evaluate(backbone, config, seed, args, out):
    """Train `config` with `seed` into `out`; returns (minutes of training, {protocol: top-1})."""
    warmup = min(CONFIG_WARMUP_EPOCHS, args.epochs - 1) if args.epochs else None
    job = launch.Job(config, args.data, out, epochs=args.epochs, warmup_epochs=warmup, batch_size=args.batch_size,
                     seed=seed, workers=args.workers)
    start = time.time()
    trained = launch.run(backbone, job, args.nproc, log=os.path.join(out, 'train.log'))['weights']
    minutes = (time.time() - start) / 60
    accuracy = {}
    for protocol in PROTOCOLS:
        evaluation = launch.Job(config, args.data, os.path.join(out, 'eval'), evaluate=True, checkpoint=trained,
                                protocol=protocol, batch_size=args.batch_size, seed=EVAL_SEED, workers=args.workers)
        accuracy[protocol] = launch.run(backbone, evaluation, log=os.path.join(out, f'eval-{protocol}.log'))['acc1']
    return minutes, accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', required=True, help='CIFAR-10 in ImageNet layout (train/ and val/)')
    parser.add_argument('--backbones', nargs='+', default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1])
    parser.add_argument('--epochs', type=int, default=None, help='override the configs\' 30 epochs')
    parser.add_argument('--batch-size', type=int, default=None, help='override the per-process batch size')
    parser.add_argument('--nproc', type=int, default=1, help='training processes')
    parser.add_argument('--workers', type=int, default=2, help='data-loading workers per process')
    parser.add_argument('--workdir', default='/tmp/ista2-study')
    args = parser.parse_args()
    args.data, args.workdir = os.path.abspath(args.data), os.path.abspath(args.workdir)
    rows = []
    for backbone in args.backbones:
        for config in BACKBONES[backbone].cifar:
            name = config_name(config)
            accuracy = {p: [] for p in PROTOCOLS}
            minutes = []
            for seed in args.seeds:
                out = os.path.join(args.workdir, backbone, name, f'seed{seed}')
                os.makedirs(out, exist_ok=True)
                train_minutes, seed_accuracy = train_and_evaluate(backbone, config, seed, args, out)
                minutes.append(train_minutes)
                for protocol, acc1 in seed_accuracy.items():
                    accuracy[protocol].append(acc1)
                print(f'{name} seed {seed}: ' + ', '.join(f'{p} {a:.2f}' for p, a in seed_accuracy.items()), flush=True)
            rows.append((name, accuracy, statistics.mean(minutes)))
    print(f'\ntop-1 (%) on CIFAR-10 val, mean ± half-range over seeds {args.seeds}')
    print(f'{"config":36} ' + ' '.join(f'{p:>15}' for p in PROTOCOLS) + f' {"train min":>10}')
    for name, accuracy, minutes in rows:
        cells = [f'{statistics.mean(a):6.2f} ± {(max(a) - min(a)) / 2:5.2f}' for a in accuracy.values()]
        print(f'{name:36} ' + ' '.join(f'{c:>15}' for c in cells) + f' {minutes:10.1f}')


if __name__ == '__main__':
    main()
