"""Shared fixtures: a tiny generated image-folder dataset and a runner for the trainers' command lines."""
import faulthandler
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.demo_data import generate

ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionstart(session):
    """Build ISTA2's fused CPU kernels once, before any test, so that trainer subprocesses load
    them from the cache instead of building them under a test's timeout or file-size limit. A build or
    load that hangs ends the run after 10 minutes with every thread's traceback (the tests' own timeout,
    pytest-timeout's, does not cover this hook)."""
    from common import ista2
    if ista2.CPU_KERNELS:
        faulthandler.dump_traceback_later(600, exit=True)
        ista2._load_cpu_kernels()
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def float64():
    """float64 as the default dtype during the test (the oracle comparisons), the previous one after it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """10 classes, 8 train and 4 val images each, 32 px."""
    return generate(str(tmp_path_factory.mktemp('data') / 'tiny'), train_per_class=8, val_per_class=4, size=32)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def trainer_env():
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'PYTHONUNBUFFERED': '1',
            'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')}


def command(args, nproc=None, launcher=None, port=None, max_restarts=0):
    """plain python, torchrun with nproc processes, or another launcher ('bash' for run.sh)."""
    if launcher:
        return [launcher] + [str(a) for a in args]
    cmd = [sys.executable]
    if nproc:
        cmd += ['-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port',
                str(port or free_port()), '--max-restarts', str(max_restarts)]
    return cmd + [str(a) for a in args]


def run(cwd, args, nproc=None, expect_ok=True, timeout=300, launcher=None, port=None):
    """Run a trainer in `cwd` (relative to the repo): see `command` and `execute`."""
    return execute(cwd, command(args, nproc, launcher, port), expect_ok, timeout)


def execute(cwd, cmd, expect_ok=True, timeout=300, max_file_bytes=None):
    """Run `cmd` in `cwd` with this venv's python first on the PATH and return its output.
    max_file_bytes caps the size of every file it writes (RLIMIT_FSIZE), as a full disk would."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    proc = subprocess.run(cmd, cwd=ROOT / cwd, env=trainer_env(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if max_file_bytes is not None else None)
    output = proc.stdout + proc.stderr
    if expect_ok and proc.returncode:
        raise AssertionError(f'exit {proc.returncode}:\n{output[-4000:]}')
    if not expect_ok and not proc.returncode:
        raise AssertionError(f'expected a failure:\n{output[-4000:]}')
    return output
