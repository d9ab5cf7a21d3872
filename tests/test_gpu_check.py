"""benchmarks/gpu_check.py (`make gpu-check`) in its CPU smoke mode: every part runs and reports without importing
the test suite or pytest (the oracle it shares with the tests is common/ista2_oracle.py), what cannot run without a
GPU is a SKIP that says why, the exit status follows the correctness checks only, and the grad-scaler probe reads the
state a trainer process starts from."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from common import launch
from tests.conftest import ROOT, trainer_env

SCRIPT = ROOT / 'benchmarks' / 'gpu_check.py'

# `python -c WITHOUT_TEST_SUITE script args...` runs the script as __main__ in a process where importing pytest or the
# test suite (`tests`, importable from the working directory, the repository) raises ModuleNotFoundError; the exit
# status is the script's.
WITHOUT_TEST_SUITE = """
import importlib.abc
import runpy
import sys


class RefuseTestSuite(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in ('tests', 'pytest', '_pytest'):
            raise ModuleNotFoundError(f'{name} is refused here: the script must run without the test suite', name=name)


sys.meta_path.insert(0, RefuseTestSuite())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.fixture(scope='module')
def gpu_check():
    if 'gpu_check' not in sys.modules:
        spec = importlib.util.spec_from_file_location('gpu_check', SCRIPT)
        sys.modules['gpu_check'] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules['gpu_check'])
    return sys.modules['gpu_check']


def lines_of(report, part):
    return [line for line in report['lines'] if line['part'] == part]


@pytest.mark.parametrize('module', ['tests.test_ista2', 'pytest'])
def test_the_smoke_run_process_refuses_the_test_suite(tmp_path, module):
    script = tmp_path / 'imports.py'
    script.write_text(f'import {module}\n')
    proc = subprocess.run([sys.executable, '-c', WITHOUT_TEST_SUITE, str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    refused = module.partition('.')[0]  # a submodule's package is imported, and refused, first
    assert proc.returncode == 1 and f'ModuleNotFoundError: {refused} is refused here' in proc.stderr, proc.stderr


def test_the_cpu_smoke_run_reports_every_part(tmp_path):
    """The command line, as CI runs it (the trainers for PVT only: each backbone takes 10-20 s on a CPU), in a
    process that cannot import the test suite."""
    result = tmp_path / 'report.json'
    cmd = [sys.executable, '-c', WITHOUT_TEST_SUITE, str(SCRIPT), '--device', 'cpu', '--quick', '--backbones', 'pvt',
           '--workdir', str(tmp_path / 'work'), '--json', str(result)]
    proc = subprocess.run(cmd, cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    report = json.loads(result.read_text())
    assert {line['part'] for line in report['lines']} == {'ista2', 'nccl', 'trainers', 'speed', 'timm'}

    ista2 = lines_of(report, 'ista2')  # the oracle's own check, then 2 code paths x 3 precisions x 2 case groups
    assert len(ista2) == 1 + 2 * 3 * 2 + 1 and all(line['status'] == 'PASS' for line in ista2)
    assert any('torch path (CPU_KERNELS=False)' in line['check'] for line in ista2)
    assert {line['check'].split(',')[0] for line in ista2[1:-1]} == {'fp32', 'fp16 autocast', 'bf16 autocast'}
    assert ista2[-1]['check'] == "ISTA2's fused C++ kernels loaded (no fallback warning)"

    [nccl] = lines_of(report, 'nccl')
    assert nccl['status'] == 'SKIP' and 'NCCL needs a GPU' in nccl['note'] and 'gloo' in nccl['note']
    assert nccl['measured'].endswith(' ok')

    trainers = {line['check']: line for line in lines_of(report, 'trainers')}
    assert [c for c, line in trainers.items() if line['status'] == 'PASS'] == [
        'PVTv2: train 2 epochs (fp32: no CUDA)', 'PVTv2: auto-resume (rerun with 3 epochs)',
        'PVTv2: evaluate: main.py --eval --dist-eval']
    skipped = [line for line in trainers.values() if line['status'] == 'SKIP']
    assert len(skipped) == 3 and all(line['note'] for line in skipped)
    scaler = trainers['PVTv2: grad scaler state survives the resume']['note']
    assert 'CUDA-only' in scaler and 'the probe ran in the resumed process' in scaler
    group = trainers['PVTv2: process group (NCCL on CUDA, even for one process)']['note']
    assert 'a CPU run joins no group with one process' in group

    speed = lines_of(report, 'speed')  # 3 CIFAR pairs x (time, memory); targets never asserted
    assert len(speed) == 6 and all(line['status'] == 'SKIP' and not line['asserted'] for line in speed)
    assert all(line['measured'].endswith('img/s)') for line in speed if 'train step' in line['check'])

    timm = lines_of(report, 'timm')
    assert [line['status'] for line in timm] == ['PASS', 'SKIP', 'PASS', 'SKIP', 'PASS', 'SKIP']
    assert 'ms)' in timm[1]['measured'] and all(not line['asserted'] for line in timm[1::2])

    out = proc.stdout
    assert 'ISTA2 on cpu against the CPU float64 oracle' in out and 'Trainers through their real launchers' in out
    assert out.rstrip().splitlines()[-1].startswith('checks: ') and out.rstrip().endswith('exit status 0')


def test_the_probe_records_the_first_enabled_scaler_in_a_trainer_process(tmp_path):
    probe = tmp_path / 'probe.json'
    state = {'scale': 512.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
             '_growth_tracker': 7}
    code = ('import torch\n'
            "torch.amp.GradScaler('cpu', enabled=False).scale(torch.ones(()))\n"
            "s = torch.amp.GradScaler('cpu')\n"
            f's.load_state_dict({state!r})\n'
            's.scale(torch.ones(()))\n'
            's.update(new_scale=4.)\n'
            's.scale(torch.ones(()))\n')
    env = {**trainer_env(), 'PYTHONPATH': str(ROOT / 'benchmarks' / 'gpu_check_site'),
           'ISTA2_SCALER_PROBE': str(probe)}
    subprocess.run([sys.executable, '-c', code], env=env, check=True)
    assert not probe.exists()  # not a torchrun worker: the probe stays out of the way
    subprocess.run([sys.executable, '-c', code], env={**env, 'LOCAL_RANK': '0'}, check=True)
    assert json.loads(probe.read_text())['scaler'] == state


def test_only_failed_correctness_checks_set_the_exit_status(gpu_check):
    report = gpu_check.Report()
    report.titles['speed'] = 'Speed'
    report.add('speed', 'ratio', False, '1.20', '<= 1.05', asserted=False)
    report.skip('speed', 'memory', 'no GPU', asserted=False)
    report.skip('speed', 'scaler', 'no GPU')
    assert report.exit_status() == 0
    text = report.text('header')
    assert 'FAIL*   ratio   1.20' in text and 'SKIP    scaler' in text and text.endswith('exit status 0')
    assert '0 met, 1 missed, 1 skipped' in text
    report.add('speed', 'equal', False)
    assert report.exit_status() == 1 and report.text('header').endswith('exit status 1')


def test_a_crashing_part_fails_and_the_others_still_run(gpu_check, monkeypatch, tmp_path, capsys):
    def crash(report, device):
        raise RuntimeError('NCCL error: unhandled system error')

    monkeypatch.setattr(gpu_check, 'part_nccl', crash)
    args = gpu_check.parse_args(['--device', 'cpu', '--quick', '--parts', 'nccl', 'speed',
                                 '--workdir', str(tmp_path)])
    pairs = gpu_check.speed_pairs
    monkeypatch.setattr(gpu_check, 'speed_pairs', lambda quick: pairs(quick)[:1])
    assert gpu_check.run(args) == 1
    out = capsys.readouterr().out
    assert 'FAIL    nccl part  RuntimeError  no exception  NCCL error: unhandled system error' in out
    assert 'PVTv2-B0 (CIFAR config): train step ISTA2/baseline' in out and f'kept in {tmp_path}' in out


def test_a_failed_launch_fails_its_step_and_skips_the_rest(gpu_check, monkeypatch, tmp_path, capsys):
    def fail(backbone, job, nproc=1, *, log, show=False, timeout=None):
        raise launch.LaunchError(f'torchrun ... exited with status 1; its output is in {log}')

    monkeypatch.setattr(launch, 'run', fail)
    args = gpu_check.parse_args(['--device', 'cpu', '--quick', '--parts', 'trainers', '--backbones', 'swin',
                                 '--workdir', str(tmp_path), '--json', str(tmp_path / 'r.json')])
    assert gpu_check.run(args) == 1
    lines = json.loads((tmp_path / 'r.json').read_text())['lines']
    assert [line['status'] for line in lines] == ['FAIL'] + ['SKIP'] * 5
    assert 'LaunchError' in lines[0]['measured'] and str(tmp_path / 'swin' / 'train.log') in lines[0]['note']
    assert all(line['note'] == 'an earlier step failed' for line in lines[1:5])


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message shown without a GPU')
def test_without_a_gpu_the_default_run_stops_and_names_the_smoke_mode(gpu_check, capsys):
    assert gpu_check.main(['--parts', 'nccl']) == 2
    assert '--device cpu --quick' in capsys.readouterr().err
