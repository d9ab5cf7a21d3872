"""The CIFAR-10 study: does ISTA2 help, and does the gain survive batch-independent evaluation?

    python benchmarks/cifar_study.py --data /tmp/cifar10 [--models PVTv2-B0 PVTv2-B2 Swin-T CvT-13]
        [--seeds 0 1] [--epochs N] [--nproc 1] [--in-memory] [--parallel 1] [--workdir /tmp/ista2-study]

For each of the paper's four models, the baseline config and the ISTA2 config with eval_align='bank'
(common/backbones.py: its training is that of the plain ISTA2 config; the bank only changes evaluation) are
trained through the backbone's real launcher (common/launch.py), once per seed. Each trained ISTA2 model is
evaluated aligning against the batch (the reference), its bank as training left it, its bank rebuilt from
training images by the trainer's own command, and nothing ('off'); every model under each of the trainers'
protocols (common/trainer.py PROTOCOLS): validation images in class order with the trainer's evaluation batch
(the reference protocol), the same images in one shuffled order, and batch size 1. Prints top-1 (mean and
half-range over seeds), evaluation seconds and peak memory per protocol, and what the bank costs; writes every
figure to <workdir>/results.json. Rerunning skips finished trainings (they resume as done).

For a GPU: --in-memory decodes the JPEGs once per run instead of once per sample, and --parallel N runs N
(model, seed) jobs at a time, so that several of these small 32 px models share the GPU (each job is its own
processes; choose --workers so that N x (workers + 1) fits the CPU cores).
"""
import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from common import checkpoint, launch
from common.backbones import BACKBONES, config_name
from common.trainer import PROTOCOLS

MODELS = {row: (backbone, configs) for backbone, entry in BACKBONES.items() for row, configs in entry.cifar.items()}
CONFIG_WARMUP_EPOCHS = 3  # what every CIFAR-10 config sets; capped below a shorter --epochs
EVAL_SEED = 0  # fixes the one shuffled order, the same for every model
# evaluations of an ISTA2 model: row name -> (eval_align, whether to use the rebuilt bank)
ISTA2_EVALUATIONS = {'batch': ('batch', False), 'bank': ('bank', False), 'bank, rebuilt': ('bank', True),
                     'off': ('off', False)}


def loading(args):
    """The Job settings every run of the study shares."""
    return dict(batch_size=args.batch_size, workers=args.workers, in_memory=args.in_memory or None)


def train(backbone, config, seed, args, out):
    """Train `config` with `seed` into `out`; returns (the run's result, minutes)."""
    warmup = min(CONFIG_WARMUP_EPOCHS, args.epochs - 1) if args.epochs else None
    job = launch.Job(config, args.data, out, epochs=args.epochs, warmup_epochs=warmup, seed=seed, **loading(args))
    start = time.time()
    result = launch.run(backbone, job, args.nproc, log=os.path.join(out, 'train.log'))
    return result, (time.time() - start) / 60


def evaluate(backbone, config, weights, args, out, name, eval_align=None):
    """{protocol: the evaluation's result} for `weights` under every protocol."""
    results = {}
    for protocol in PROTOCOLS:
        job = launch.Job(config, args.data, os.path.join(out, 'eval'), evaluate=True, checkpoint=weights,
                         protocol=protocol, eval_align=eval_align, seed=EVAL_SEED, **loading(args))
        results[protocol] = launch.run(backbone, job, log=os.path.join(out, f'eval-{name}-{protocol}.log'))
    return results


def bank_values(weights):
    """How many numbers the checkpoint's ISTA2 banks hold (every layer's bank, bank_count excluded)."""
    state = checkpoint.model_state(checkpoint.load(weights))
    return sum(v.numel() for k, v in state.items() if k.endswith('.ista2.bank'))


def run_seed(model, seed, args):
    """Train the baseline and ISTA2 configs of `model` (a row title) with `seed` and evaluate them -> {row: figures}."""
    backbone, configs = MODELS[model]
    baseline, ista2, rows = configs.baseline, configs.bank, {}
    out = os.path.join(args.workdir, backbone, config_name(baseline), f'seed{seed}')
    os.makedirs(out, exist_ok=True)
    result, minutes = train(backbone, baseline, seed, args, out)
    rows[config_name(baseline)] = dict(evaluations=evaluate(backbone, baseline, result['weights'], args, out, 'plain'),
                                       train_minutes=minutes, parameters=result['n_parameters'])
    out = os.path.join(args.workdir, backbone, config_name(ista2), f'seed{seed}')
    os.makedirs(out, exist_ok=True)
    result, minutes = train(backbone, ista2, seed, args, out)
    rebuilt = launch.run(backbone, launch.Job(ista2, args.data, out, rebuild_bank=True, checkpoint=result['weights'],
                                              seed=seed, **loading(args)), log=os.path.join(out, 'rebuild-bank.log'))
    for row, (eval_align, use_rebuilt) in ISTA2_EVALUATIONS.items():
        weights = rebuilt['checkpoint'] if use_rebuilt else result['weights']
        rows[f'{config_name(ista2)} [{row}]'] = dict(
            evaluations=evaluate(backbone, ista2, weights, args, out, row.replace(', ', '-'), eval_align),
            train_minutes=minutes, parameters=result['n_parameters'], bank_values=bank_values(weights),
            rebuild_images=rebuilt['images'] if use_rebuilt else None)
    return rows


def spread(values):
    return f'{statistics.mean(values):6.2f} ± {(max(values) - min(values)) / 2:4.2f}'


def print_tables(results, seeds):
    names = list(next(iter(results.values())))
    print(f'\ntop-1 (%) on CIFAR-10 val, mean ± half-range over seeds {seeds}; ISTA2 rows: one trained model per seed, '
          'evaluated aligning against [what]')
    print(f'{"model [eval_align]":42} ' + ' '.join(f'{p:>15}' for p in PROTOCOLS) + f' {"train min":>10}')
    for name in names:
        per_seed = [results[s][name] for s in seeds]
        cells = [spread([r['evaluations'][p]['acc1'] for r in per_seed]) for p in PROTOCOLS]
        minutes = statistics.mean(r['train_minutes'] for r in per_seed)
        print(f'{name:42} ' + ' '.join(f'{c:>15}' for c in cells) + f' {minutes:10.1f}')
    print('\nevaluation cost, mean over seeds: seconds for the 10,000 images / peak process memory (MiB; CUDA: '
          'allocated), per protocol; parameters; bank size')
    print(f'{"model [eval_align]":42} ' + ' '.join(f'{p:>17}' for p in PROTOCOLS) + f' {"params":>10} {"bank":>16}')
    for name in names:
        per_seed = [results[s][name] for s in seeds]
        cells = [f'{statistics.mean(r["evaluations"][p]["seconds"] for r in per_seed):6.1f} s / '
                 f'{statistics.mean(r["evaluations"][p]["peak_memory_mib"] for r in per_seed):4.0f}'
                 for p in PROTOCOLS]
        bank = per_seed[0].get('bank_values') or 0
        bank_cell = f'{bank:,} ({bank * 4 / 2 ** 20:.2f} MiB)' if bank else '-'
        print(f'{name:42} ' + ' '.join(f'{c:>17}' for c in cells) + f' {per_seed[0]["parameters"]:>10,} '
              f'{bank_cell:>16}')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', required=True, help='CIFAR-10 in ImageNet layout (train/ and val/)')
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1])
    parser.add_argument('--epochs', type=int, default=None, help='override the configs\' 30 epochs')
    parser.add_argument('--batch-size', type=int, default=None, help='override the per-process batch size')
    parser.add_argument('--nproc', type=int, default=1, help='training processes')
    parser.add_argument('--workers', type=int, default=2, help='data-loading workers per process')
    parser.add_argument('--in-memory', action='store_true', help='decode the images once per run into memory')
    parser.add_argument('--parallel', type=int, default=1, help='(model, seed) jobs run at a time')
    parser.add_argument('--workdir', default='/tmp/ista2-study')
    args = parser.parse_args()
    args.data, args.workdir = os.path.abspath(args.data), os.path.abspath(args.workdir)
    if args.parallel < 1:
        parser.error(f'--parallel {args.parallel}: must be at least 1')
    jobs = [(model, seed) for model in args.models for seed in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:  # threads that wait on the launched processes
        done = pool.map(lambda job: (job[1], run_seed(*job, args)), jobs)
        results = {seed: {} for seed in args.seeds}
        for seed, rows in done:
            results[seed].update(rows)
            for name, row in rows.items():
                top1 = ', '.join(f'{p} {e["acc1"]:.2f}' for p, e in row['evaluations'].items())
                print(f'{name} seed {seed}: {top1}', flush=True)
    with open(os.path.join(args.workdir, 'results.json'), 'w') as f:
        json.dump({'settings': vars(args), 'results': results}, f, indent=1)
    print_tables(results, args.seeds)


if __name__ == '__main__':
    main()
