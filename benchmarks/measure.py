"""Timing and peak-memory helpers for the benchmark scripts (each variant runs in its own process)."""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def add_step_args(parser, repeats):
    """The options of a train-step benchmark, and the hidden --worker NAME BATCH SIZE REPEATS of its processes."""
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=repeats, help='timed steps per process')
    parser.add_argument('--rounds', type=int, default=3, help='processes per model, alternating')
    parser.add_argument('--worker', nargs=4, help=argparse.SUPPRESS)


def device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU, {torch.get_num_threads()} threads'


def train_step(model, optimizer, images, labels):
    """A callable: forward, cross-entropy, backward and an optimizer update (synchronised on CUDA)."""
    def step():
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if images.is_cuda:
            torch.cuda.synchronize()
    return step


def current_rss_mib():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def time_step(step, repeats):
    """Median seconds of `step()` over `repeats` calls after one warm-up call, and the peak resident
    memory (MiB) the calls added above the process's footprint before the first one."""
    before = current_rss_mib()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {'seconds': statistics.median(times[1:]), 'peak_mib': peak - before}


def report(result):
    """Worker side: print the result for `isolated`."""
    print(json.dumps(result))


def isolated(script, *args):
    """Run `python script --worker args...` in a fresh process and return what it reported."""
    cmd = [sys.executable, script, '--worker', *map(str, args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(script, variants, worker_args, rounds):
    """Run every variant once per round, alternating, so that drifts in machine speed hit all
    of them alike; returns {variant: {'seconds': median over rounds, 'peak_mib': max}}."""
    runs = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            runs[v].append(isolated(script, v, *worker_args))
    return {v: {'seconds': statistics.median(r['seconds'] for r in rs), 'peak_mib': max(r['peak_mib'] for r in rs)}
            for v, rs in runs.items()}
