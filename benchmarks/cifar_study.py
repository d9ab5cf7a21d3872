"""The CIFAR-10 study: does ISTA2 help, and does the gain survive batch-independent evaluation?

    python benchmarks/cifar_study.py --data /tmp/cifar10 [--backbones pvt swin cvt] [--seeds 0 1]
        [--epochs N] [--nproc 1] [--workdir /tmp/ista2-study]

For each backbone, its baseline/ISTA2 config pair under configs/cifar10 (experiments/cifar10 for
CvT) is trained through the backbone's real launcher, once per seed, and every trained model is
evaluated under three protocols: (a) the reference one, validation images in class order with the
trainer's evaluation batch; (b) the same images shuffled once with a fixed seed; (c) batch size 1,
where ISTA2 has no other image to align with. Prints top-1 (mean and spread over seeds).
"""
import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOLS = ('class order', 'shuffled', 'batch 1')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def torchrun(nproc):
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port',
            free_port()]


class Pvt:
    cwd, pair = 'PVT/classification', ('pvt_v2_b0', 'pvt_v2_b0_ista2')
    pattern = r'\* Acc@1 ([\d.]+)'

    def train(self, name, seed, args, out):
        extra = ['--epochs', str(args.epochs)] if args.epochs else []
        extra += ['--batch-size', str(args.batch_size)] if args.batch_size else []
        return torchrun(args.nproc) + ['main.py', '--config', f'configs/cifar10/{name}.py', '--data-path', args.data,
                                       '--output_dir', out, '--seed', str(seed), '--num_workers', str(args.workers),
                                       *extra]

    def evaluate(self, name, protocol, args, out):
        batch = ['--batch-size', '1'] if protocol == 'batch 1' else (
            ['--batch-size', str(args.batch_size)] if args.batch_size else [])
        shuffle = ['--shuffle-eval'] if protocol == 'shuffled' else []
        return torchrun(1) + ['main.py', '--eval', '--config', f'configs/cifar10/{name}.py', '--resume',
                              os.path.join(out, 'checkpoint.pth'), '--data-path', args.data, '--num_workers',
                              str(args.workers), *batch, *shuffle]


class Swin:
    cwd, pair = 'SWIN/classification', ('swin_tiny_patch2_window4_32', 'swin_tiny_ista2_patch2_window4_32')
    pattern = r' \* Acc@1 ([\d.]+)'

    def opts(self, args, seed):
        extra = ['TRAIN.EPOCHS', str(args.epochs), 'TRAIN.WARMUP_EPOCHS', str(min(3, args.epochs - 1))] \
            if args.epochs else []
        return ['--opts', 'SEED', str(seed), 'DATA.NUM_WORKERS', str(args.workers), *extra]

    def train(self, name, seed, args, out):
        batch = ['--batch-size', str(args.batch_size)] if args.batch_size else []
        return torchrun(args.nproc) + ['main.py', '--cfg', f'configs/cifar10/{name}.yaml', '--data-path', args.data,
                                       '--output', out, *batch, *self.opts(args, seed)]

    def evaluate(self, name, protocol, args, out):
        batch = '1' if protocol == 'batch 1' else str(args.batch_size or 128)
        return torchrun(1) + ['main.py', '--eval', '--cfg', f'configs/cifar10/{name}.yaml', '--data-path', args.data,
                              '--output', out, '--batch-size', batch, '--resume',
                              os.path.join(out, name, 'default', 'ckpt.pth'), *self.opts(args, 0),
                              'TEST.SHUFFLE', str(protocol == 'shuffled')]


class Cvt:
    cwd, pair = 'CVT/classification', ('cvt-13-32x32', 'cvt-13-ista2-32x32')
    pattern = r'Accuracy@1 ([\d.]+)%'

    def common(self, name, args, out, job, gpus):
        return ['bash', 'run.sh', '-g', str(gpus), '-t', job, '-p', free_port(), '--cfg',
                f'experiments/cifar10/{name}.yaml', 'DATASET.ROOT', args.data, 'OUTPUT_DIR', out, 'WORKERS',
                str(args.workers)]

    def train(self, name, seed, args, out):
        extra = ['TRAIN.END_EPOCH', str(args.epochs)] if args.epochs else []
        extra += ['TRAIN.BATCH_SIZE_PER_GPU', str(args.batch_size)] if args.batch_size else []
        return self.common(name, args, out, 'train', args.nproc) + ['SEED', str(seed), *extra]

    def evaluate(self, name, protocol, args, out):
        batch = '1' if protocol == 'batch 1' else str(args.batch_size or 128)
        return self.common(name, args, out, 'test', 1) + [
            'TEST.MODEL_FILE', os.path.join(out, 'imagenet', name, 'final_state.pth'), 'TEST.BATCH_SIZE_PER_GPU',
            batch, 'TEST.SHUFFLE', str(protocol == 'shuffled')]


BACKBONES = {'pvt': Pvt(), 'swin': Swin(), 'cvt': Cvt()}


def run(cmd, cwd, log):
    env = {**os.environ, 'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')}
    with open(log, 'w') as f:
        proc = subprocess.run(cmd, cwd=os.path.join(ROOT, cwd), env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f'failed (exit {proc.returncode}): {" ".join(cmd)}\nsee {log}')
    with open(log) as f:
        return f.read()


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
    args.data = os.path.abspath(args.data)
    rows = []
    for key in args.backbones:
        backbone = BACKBONES[key]
        for name in backbone.pair:
            accuracy = {p: [] for p in PROTOCOLS}
            minutes = []
            for seed in args.seeds:
                out = os.path.join(args.workdir, key, name, f'seed{seed}')
                os.makedirs(out, exist_ok=True)
                start = time.time()
                run(backbone.train(name, seed, args, out), backbone.cwd, os.path.join(out, 'train.log'))
                minutes.append((time.time() - start) / 60)
                for protocol in PROTOCOLS:
                    log = run(backbone.evaluate(name, protocol, args, out), backbone.cwd,
                              os.path.join(out, f'eval-{protocol.replace(" ", "-")}.log'))
                    accuracy[protocol].append(float(re.findall(backbone.pattern, log)[-1]))
                print(f'{name} seed {seed}: ' + ', '.join(f'{p} {accuracy[p][-1]:.2f}' for p in PROTOCOLS), flush=True)
            rows.append((name, accuracy, statistics.mean(minutes)))
    print(f'\ntop-1 (%) on CIFAR-10 val, mean ± half-range over seeds {args.seeds}')
    print(f'{"config":36} ' + ' '.join(f'{p:>15}' for p in PROTOCOLS) + f' {"train min":>10}')
    for name, accuracy, minutes in rows:
        cells = [f'{statistics.mean(a):6.2f} ± {(max(a) - min(a)) / 2:5.2f}' for a in accuracy.values()]
        print(f'{name:36} ' + ' '.join(f'{c:>15}' for c in cells) + f' {minutes:10.1f}')


if __name__ == '__main__':
    main()
