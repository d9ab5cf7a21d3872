"""The quickstart demo: PVTv2-B0 with and without ISTA2 on a small generated dataset.

    python demo.py [--workdir /tmp/ista2-demo] [--epochs 15]

Generates 10 classes of synthetic 64 px images, then trains each model and evaluates it under the
reference protocol and at batch 1 through the real command lines (printed as they run; see
common/launch.py), and prints a side-by-side table. The recipe is the paper's except for what a
600-image, 64 px dataset needs: a higher base learning rate, 2 warm-up epochs, and no mixup,
cutmix, RandAugment or random erasing.
"""
import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common import launch  # noqa: E402
from common.backbones import BACKBONES, config_name  # noqa: E402
from common.demo_data import CLASSES, generate  # noqa: E402

PVT = BACKBONES['pvt']
CONFIGS = PVT.paper['PVTv2-B0']
BATCH, WORKERS, SIZE = 32, 2, 64
TRAIN_RECIPE = {'--input-size': SIZE, '--lr': 8e-3, '--mixup': 0, '--cutmix': 0, '--aa': '', '--reprob': 0}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', default='/tmp/ista2-demo')
    parser.add_argument('--epochs', type=int, default=15)
    args = parser.parse_args()
    workdir = os.path.abspath(args.workdir)
    data = generate(os.path.join(workdir, 'data'), train_per_class=60, val_per_class=20, size=SIZE)
    print(f'dataset: {data} ({len(CLASSES)} classes, 600 train / 200 val images, {SIZE} px)', flush=True)
    rows = []
    for config in CONFIGS:
        name = config_name(config)
        out = os.path.join(workdir, name)
        shutil.rmtree(out, ignore_errors=True)  # a fresh run each time, not a resumed one
        job = launch.Job(config, data, out, epochs=args.epochs, warmup_epochs=2, batch_size=BATCH, workers=WORKERS,
                         extra=TRAIN_RECIPE)
        start = time.time()
        trained = launch.run('pvt', job, log=os.path.join(workdir, f'{name}.train.log'), show=True)
        minutes = (time.time() - start) / 60
        evaluations = {}
        for protocol in ('class-order', 'batch-1'):
            evaluation = launch.Job(config, data, os.path.join(out, 'eval'), evaluate=True,
                                    checkpoint=trained['weights'], protocol=protocol, batch_size=BATCH,
                                    workers=WORKERS, extra={'--input-size': SIZE})
            log = os.path.join(workdir, f'{name}.eval-{protocol}.log')
            evaluations[protocol] = launch.run('pvt', evaluation, log=log, show=True)
        rows.append((name, trained['n_parameters'], minutes, evaluations['class-order'], evaluations['batch-1']))
    print(f'\nPVTv2-B0 on the demo dataset, {args.epochs} epochs, CPU/GPU as available (logs in {workdir})')
    print(f'{"config":18} {"params":>9} {"train min":>9} {"top-1":>6} {"top-5":>6} {"top-1, eval batch 1":>20}')
    for name, params, minutes, reference, single in rows:
        print(f'{name:18} {params:9d} {minutes:9.1f} {reference["acc1"]:6.1f} {reference["acc5"]:6.1f} '
              f'{single["acc1"]:20.1f}')
    print(f'top-1/top-5: the reference protocol (val in class order, eval batch {int(1.5 * BATCH)}); "eval batch 1" '
          'has no other images to align with, so ISTA2 reduces to its norms.')


if __name__ == '__main__':
    main()
