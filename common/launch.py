"""One launcher for every backbone: a generic Job becomes the backbone's own command line (see
common.backbones), runs in the backbone's folder, and its structured result (common.trainer.report)
comes back as a dict.

    result = run('pvt', Job('configs/cifar10/pvt_v2_b0.py', data, out, epochs=1), log='train.log')
    run('pvt', Job(..., evaluate=True, checkpoint=result['weights'], protocol='batch-1'), log='eval.log')
"""
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field

from common.backbones import BACKBONES, ROOT


@dataclass(frozen=True)
class Job:
    """One training or evaluation run in generic settings; None leaves the config's (or the trainer's)
    value. Paths are as the backbone's command line reads them: relative ones are relative to its folder."""
    config: str
    data: str
    output: str  # the run's output folder (the trainer makes its own run folder inside, if it does)
    evaluate: bool = False
    rebuild_bank: bool = False  # refill the checkpoint's ISTA2 banks (common.trainer.rebuild_bank) instead
    checkpoint: str | None = None  # evaluation, bank rebuild: the weights (default: the trainer's choice in `output`)
    protocol: str | None = None  # a name in common.trainer.PROTOCOLS
    eval_align: str | None = None  # ISTA2's eval_align, replacing the config's ('batch', 'bank' or 'off')
    epochs: int | None = None
    warmup_epochs: int | None = None
    batch_size: int | None = None  # per process; the trainer derives its evaluation batch from it as usual
    seed: int | None = None
    workers: int | None = None
    in_memory: bool | None = None  # decode the image folders once into memory (small data sets)
    extra: dict = field(default_factory=dict)  # more of the backbone's own flags or config keys -> value


class LaunchError(RuntimeError):
    """A run that failed or reported no result."""


def words(name, value):
    """A flag and its value (a boolean: the bare flag or nothing), or a config key and its value."""
    if name.startswith('-') and isinstance(value, bool):
        return [name] if value else []
    return [name, str(value)]


def command(backbone, job, nproc=1, port=0, python='python'):
    """The backbone's own command line for `job`, as a list of words; `python` names the interpreter."""
    entry = BACKBONES[backbone]
    if job.checkpoint and not (job.evaluate or job.rebuild_bank):
        raise ValueError('Job.checkpoint names the weights to evaluate; training resumes from its output folder')
    if job.evaluate and job.rebuild_bank:
        raise ValueError('Job: evaluate or rebuild_bank, not both')
    settings = {}
    for setting, names in entry.names.items():
        value = getattr(job, setting)
        if value is not None:
            settings.update(dict.fromkeys((names,) if isinstance(names, str) else names, value))
    settings.update(job.extra)
    flags = [w for name, value in settings.items() if name.startswith('-') for w in words(name, value)]
    keys = [w for name, value in settings.items() if not name.startswith('-') for w in words(name, value)]
    if keys and entry.keys_after is None:
        raise ValueError(f'{entry.title} takes no config keys on its command line: {keys[::2]}')
    action = 'evaluate' if job.evaluate else 'rebuild_bank' if job.rebuild_bank else 'train'
    launcher = [w.format(python=python, nproc=nproc, port=port) for w in entry.commands[action]]
    return launcher + flags + ([*entry.keys_after, *keys] if keys else [])


PORTS_GIVEN, PORTS_LOCK = set(), threading.Lock()


def free_port():
    """A port free now and never handed out before by this process, so that runs launched at the same time
    from several threads (benchmarks/cifar_study.py --parallel) do not get the same master port."""
    with PORTS_LOCK:
        while True:
            with socket.socket() as s:
                s.bind(('127.0.0.1', 0))
                port = s.getsockname()[1]
            if port not in PORTS_GIVEN:
                PORTS_GIVEN.add(port)
                return port


def run(backbone, job, nproc=1, *, log, show=False, timeout=None):
    """Run `job` with `nproc` processes in the backbone's folder, this interpreter's folder first on
    the PATH, its output written to the file `log`; returns the result the run reported. With `show`,
    print the command first (as typed in the backbone's folder); `timeout` (s) stops a run that hangs."""
    port = free_port()
    cmd = command(backbone, job, nproc, port, python=sys.executable)
    if show:
        print('$ ' + shlex.join(command(backbone, job, nproc, port)), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, 'result.json')
        env = {**os.environ, 'ISTA2_RESULT_FILE': result_file,
               'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')}
        with open(log, 'w') as f:
            try:
                status = subprocess.run(cmd, cwd=os.path.join(ROOT, BACKBONES[backbone].folder), env=env, stdout=f,
                                        stderr=subprocess.STDOUT, timeout=timeout).returncode
                problem = f'exited with status {status}' if status else 'exited without reporting a result'
            except subprocess.TimeoutExpired:
                status, problem = None, f'was stopped after {timeout} s'
        if status == 0 and os.path.isfile(result_file):
            with open(result_file) as f:
                return json.load(f)
    with open(log) as f:
        tail = f.read().splitlines()[-15:]
    raise LaunchError(f'{shlex.join(cmd)}\n(in {BACKBONES[backbone].folder}) {problem}; its output is in {log}, '
                      f'ending:\n' + '\n'.join(tail))
