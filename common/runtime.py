"""The process's runtime: device, process group (torchrun or a single process), CPU tuning."""
import ctypes
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from common.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_runtime(device=None):
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK), if any.

    device: 'cuda', 'cpu', or None for CUDA when available. Each process uses GPU LOCAL_RANK
    with NCCL, or the CPU with gloo.
    """
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (('RANK', 0), ('WORLD_SIZE', 1), ('LOCAL_RANK', 0)))
    kind = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if kind.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ConfigError(f'--device {device} was asked for but CUDA is not available; use --device cpu')
        if local >= torch.cuda.device_count():
            raise ConfigError(f'LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible')
        torch.cuda.set_device(local)
        dev = torch.device('cuda', local)
    elif kind == 'cpu':
        dev = torch.device('cpu')
    else:
        raise ConfigError(f'unknown device {device!r}; valid: cuda, cpu')
    # On GPUs a torchrun launch joins a group even alone, so one GPU exercises NCCL (evaluation's all_reduce)
    launched = 'TORCHELASTIC_RUN_ID' in os.environ
    if (world > 1 or (launched and dev.type == 'cuda')) and not dist.is_initialized():
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo', store=_group_store(rank, world),
                                rank=rank, world_size=world)
        dist.barrier()
    if dev.type == 'cpu':
        tune_cpu()
    return Runtime(rank, world, local, dev)


def _group_store(rank, world):
    """The key-value store torchrun's environment names (env://), its keys prefixed by torchrun's restart count.
    torchrun (torch 2.14 at least; 2.4 did not) keeps one store across the restarts of --max-restarts, so without
    the prefix a restarted rank can read the address a killed rank published there and fail to connect (gloo:
    'connectFullMesh failed ... Connection refused') or wait on it."""
    store, _, _ = next(dist.rendezvous('env://', rank, world))
    return dist.PrefixStore(f'restart{os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)}', store)


def tune_cpu():
    """Two process-wide settings that make CPU training markedly faster, with the same results:
    flush denormal floats to zero (Swin's -100 shift mask otherwise yields denormals that slow its
    attention matmuls ~4x), and let glibc keep freed memory for reuse instead of returning every
    large tensor to the OS and page-faulting it back in on the next step (~20% per step).
    Call it before the first parallel torch op: worker threads copy the denormal mode when they start."""
    torch.set_flush_denormal(True)
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: serve blocks up to 32 MiB (the maximum) from the heap
    libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: do not give freed heap memory back to the OS


def seed_all(seed, rank, epoch=None):
    """Seed python's random, numpy and torch (every device) for this rank: with seed + rank at
    start-up (epoch None), as upstream, and from (seed, rank, epoch) alone at the start of each
    epoch, so that a run resumed at an epoch draws exactly the numbers an uninterrupted run
    draws there (augmentation, data-loader worker seeds, mixup, drop-path, ISTA2's random tokens)."""
    if epoch is not None:
        seed = int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])
    else:
        seed = seed + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shutdown():
    """Leave the process group together after a successful run (after a failure, just exit:
    torchrun stops the other ranks)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# The tensor of the last all_reduce_sum. torch 2.4's gloo worker thread can drop its reference to a
# finished collective's tensor after the call has returned; if Python's was already gone, that drop
# frees a Python object and needs the GIL, which destroy_process_group holds while it joins that
# very thread: shutdown() then hangs (pytorch/pytorch#75097, fixed in torch by #154976). Keeping
# the tensor referenced makes the worker's drop a plain refcount decrement.
_last_reduced = None


def all_reduce_sum(values, device):
    """Sum a list of floats over all ranks (identity without a process group)."""
    global _last_reduced
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        _last_reduced = t
    return t.tolist()
