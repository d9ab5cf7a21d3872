"""Timing and peak-memory helpers for the benchmark scripts (each variant runs in its own process)."""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

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


def synchronize(device):
    """Wait for the work queued on `device` (a CUDA device; elsewhere there is nothing to wait for)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class TrainStep:
    """The train step the benchmarks time, as the trainers run it: forward and cross-entropy (under fp16 autocast
    with a grad scaler when `amp`, the trainers' CUDA default), backward and an AdamW update, on fixed random
    images (batch, 3, size, size) with labels among `classes`. Each call runs one step and returns its seconds,
    the device synchronised before and after."""

    def __init__(self, model, batch, size, classes, device, amp=None):
        self.device = torch.device(device)
        self.amp = self.device.type == 'cuda' if amp is None else amp
        self.model = model.to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        generator = torch.Generator(self.device).manual_seed(0)
        self.images = torch.randn(batch, 3, size, size, device=self.device, generator=generator)
        self.labels = torch.randint(0, classes, (batch,), device=self.device, generator=generator)
        self.rss_before = current_rss_mib()

    def __call__(self):
        synchronize(self.device)
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss = torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - start

    def warm_up(self, steps, settle=50):
        """Run `steps` untimed steps; with a grad scaler, then up to `settle` more until one leaves its scale
        as it was (the first steps of fp16 training overflow, halve the scale and skip the update: faster steps
        that are not the steady state). Peak GPU memory is counted from here on, without the warm-up's (cuDNN's
        algorithm search among them)."""
        for _ in range(steps):
            self()
        for _ in range(settle if self.amp else 0):
            scale = self.scaler.get_scale()
            self()
            if self.scaler.get_scale() == scale:
                break
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)

    def saved(self):
        """What one forward of this step (under its autocast) keeps for backward: `saved_for_backward`."""
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            return saved_for_backward(self.model, self.images)

    def peak_mib(self):
        """Peak memory since the warm-up: GPU memory allocated on CUDA; on the CPU, the peak resident memory
        above the process's footprint when this step was made (warm-up steps included: the CPU peak cannot be
        reset)."""
        if self.device.type == 'cuda':
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.rss_before  # KiB on Linux

    def measure(self, warmup, steps):
        """{'seconds': the median of `steps` timed steps after the warm-up, 'peak_mib'}."""
        self.warm_up(warmup)
        return {'seconds': statistics.median(self() for _ in range(steps)), 'peak_mib': self.peak_mib()}


@dataclass
class Saved:
    """A storage that tensors saved for backward lie in: its size, the shape and dtype of the first tensor saved
    from it, and the slots that hold it ('<grad_fn name>.<saved attribute or index>')."""
    nbytes: int
    shape: tuple
    dtype: torch.dtype
    slots: set = field(default_factory=set)


def saved_for_backward(model, *inputs):
    """The storages one forward of `model(*inputs)` (with grad) saves for backward, as torch.autograd.graph's
    saved_tensors_hooks see them (as activation checkpointing and offloading do): {storage's data_ptr: Saved}, each
    storage once however many tensors (views) of it are saved, whole, and none that a parameter lies in. The slots
    come from a walk of the autograd graph behind the output."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, alive = {}, []  # alive: each storage is kept until the end, so that no other can take its address

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in saved:
            saved[storage.data_ptr()] = Saved(storage.nbytes(), tuple(tensor.shape), tensor.dtype)
            alive.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(*inputs)
    for node, slot, tensor in _saved_slots(output.grad_fn):
        if tensor.untyped_storage().data_ptr() in saved:
            saved[tensor.untyped_storage().data_ptr()].slots.add(f'{node.name()}.{slot}')
    return saved


def _saved_slots(root):
    """(node, slot, tensor) for every tensor saved by the autograd graph from node `root` down: a custom
    Function's saved_tensors by index, a built-in node's by attribute (_saved_self: 'self')."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            values = dict(enumerate(node.saved_tensors))
        else:
            values = {name.removeprefix('_saved_'): getattr(node, name) for name in dir(node)
                      if name.startswith('_saved_')}
        for slot, value in values.items():
            for tensor in value if isinstance(value, tuple | list) else [value]:
                if isinstance(tensor, torch.Tensor):
                    yield node, slot, tensor


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
    of them alike; returns {variant: {key: the median over rounds of what the worker reported, 'peak_mib' the
    largest}}."""
    runs = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            runs[v].append(isolated(script, v, *worker_args))
    return {v: {key: (max if key == 'peak_mib' else statistics.median)(r[key] for r in rs) for key in rs[0]}
            for v, rs in runs.items()}
