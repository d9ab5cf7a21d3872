"""Shared fixtures: a tiny generated image-folder dataset and a runner for the trainers' command lines."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common.demo_data import generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """10 classes, 8 train and 4 val images each, 32 px."""
    return generate(str(tmp_path_factory.mktemp('data') / 'tiny'), train_per_class=8, val_per_class=4, size=32)


@pytest.fixture
def mismatched_data(tiny_data, tmp_path):
    """The tiny dataset with one class missing from val."""
    root = tmp_path / 'mismatched'
    shutil.copytree(tiny_data, root)
    shutil.rmtree(root / 'val' / 'dots')
    return str(root)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(cwd, args, nproc=None, expect_ok=True, timeout=300, launcher=None):
    """Run a trainer in `cwd` (relative to the repo): plain python, torchrun with nproc processes,
    or another launcher ('bash' for run.sh) with this venv's python first on the PATH."""
    if launcher:
        launcher = [launcher]
    else:
        launcher = [sys.executable]
        if nproc:
            launcher += ['-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port',
                         str(free_port())]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore',
           'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')}
    proc = subprocess.run(launcher + [str(a) for a in args], cwd=ROOT / cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    if expect_ok and proc.returncode:
        raise AssertionError(f'exit {proc.returncode}:\n{output[-4000:]}')
    if not expect_ok and not proc.returncode:
        raise AssertionError(f'expected a failure:\n{output[-4000:]}')
    return output
