"""The quickstart demo: PVTv2-B0 with and without ISTA2 on a small generated dataset.

    python demo.py [--workdir /tmp/ista2-demo] [--epochs 15]

Generates 10 classes of synthetic 64 px images, then trains and evaluates each model through the
real command lines (torchrun ... main.py --config ...), and prints a side-by-side table. The
recipe is the paper's except for what a 600-image, 64 px dataset needs: a higher base learning
rate, 2 warm-up epochs, and no mixup, cutmix, RandAugment or random erasing.
"""
import argparse
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from common.demo_data import generate  # noqa: E402

CONFIGS = ('pvt_v2_b0', 'pvt_v2_b0_ista2')
DATA_FLAGS = ['--input-size', '64', '--num_workers', '2']
TRAIN_FLAGS = [*DATA_FLAGS, '--batch-size', '32', '--lr', '8e-3', '--warmup-epochs', '2', '--mixup', '0',
               '--cutmix', '0', '--aa', '', '--reprob', '0']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(args, log_path):
    """Run main.py under torchrun (one process), teeing its output to log_path; returns the output."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '1', '--master_port', str(free_port()),
           'main.py', *args]
    print('$ torchrun ' + shlex.join(cmd[3:]), flush=True)
    with open(log_path, 'w') as log:
        proc = subprocess.run(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log.write(proc.stdout)
    if proc.returncode:
        sys.exit(f'failed (exit {proc.returncode}); see {log_path}:\n' + '\n'.join(proc.stdout.splitlines()[-15:]))
    return proc.stdout


def accuracy(output):
    acc1, acc5 = re.findall(r'\* Acc@1 ([\d.]+) Acc@5 ([\d.]+)', output)[-1]
    return float(acc1), float(acc5)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', default='/tmp/ista2-demo')
    parser.add_argument('--epochs', type=int, default=15)
    args = parser.parse_args()
    data = generate(os.path.join(args.workdir, 'data'), train_per_class=60, val_per_class=20, size=64)
    print(f'dataset: {data} (10 classes, 600 train / 200 val images, 64 px)', flush=True)
    rows = []
    for name in CONFIGS:
        out = os.path.join(args.workdir, name)
        shutil.rmtree(out, ignore_errors=True)  # a fresh run each time, not a resumed one
        config = f'configs/pvt_v2_ista2/{name}.py'
        start = time.time()
        train_log = torchrun(['--config', config, '--data-path', data, '--output_dir', out, '--epochs',
                              str(args.epochs), *TRAIN_FLAGS], os.path.join(args.workdir, f'{name}.train.log'))
        minutes = (time.time() - start) / 60
        params = int(re.search(r'number of params: (\d+)', train_log).group(1))
        ckpt = os.path.join(out, 'checkpoint.pth')
        evals = [accuracy(torchrun(['--eval', '--config', config, '--resume', ckpt, '--data-path', data,
                                    *DATA_FLAGS, '--batch-size', str(bs)],
                                   os.path.join(args.workdir, f'{name}.eval{bs}.log'))) for bs in (32, 1)]
        rows.append((name, params, minutes, *evals[0], evals[1][0]))
    print(f'\nPVTv2-B0 on the demo dataset, {args.epochs} epochs, CPU/GPU as available (logs in {args.workdir})')
    print(f'{"config":18} {"params":>9} {"train min":>9} {"top-1":>6} {"top-5":>6} {"top-1, eval batch 1":>20}')
    for name, params, minutes, acc1, acc5, acc1_single in rows:
        print(f'{name:18} {params:9d} {minutes:9.1f} {acc1:6.1f} {acc5:6.1f} {acc1_single:20.1f}')
    print('top-1/top-5: the reference protocol (val in class order, eval batch 48); "eval batch 1" has no other '
          'images to align with, so ISTA2 reduces to its norms.')


if __name__ == '__main__':
    main()
