"""benchmarks/gpu_check.py (`make gpu-check`) in its CPU smoke mode: every part runs and reports without importing
the test suite or pytest (the oracle it shares with the tests is common/ista2_oracle.py), what cannot run without a
GPU is a SKIP that says why, the exit status follows the correctness checks only, and the grad-scaler probe reads the
state a trainer process starts from."""
import importlib.util
import json
import subprocess
import sys
import time

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
    parts = ['preflight', 'ista2', 'trainers', 'speed', 'timm']
    assert list(dict.fromkeys(line['part'] for line in report['lines'])) == parts
    assert list(report['seconds']) == parts and list(report['estimates']) == parts
    assert all((tmp_path / 'work' / f'{part}.log').stat().st_size for part in parts)  # each part's own process
    assert 'CPU, ' in report['header'] and 'torch ' in report['header'] and 'numpy ' in report['header']

    preflight = {line['check'].partition(' (')[0]: line for line in lines_of(report, 'preflight')}
    assert [line['status'] for line in preflight.values()] == ['SKIP', 'PASS', 'PASS', 'SKIP', 'SKIP', 'SKIP']
    assert preflight['Python headers']['measured'].endswith('Python.h')
    nccl = preflight['NCCL process group']
    assert 'NCCL needs a GPU' in nccl['note'] and 'gloo' in nccl['note'] and nccl['measured'].endswith(' ok')

    ista2 = lines_of(report, 'ista2')  # the oracle's own check, 2 code paths x 3 precisions x 2 case groups, timm
    assert len(ista2) == 1 + 2 * 3 * 2 + 2 and all(line['status'] == 'PASS' for line in ista2)
    assert any('torch path (CPU_KERNELS=False)' in line['check'] for line in ista2)
    assert {line['check'].split(',')[0] for line in ista2[1:-2]} == {'fp32', 'fp16 autocast', 'bf16 autocast'}
    assert all('near-tie flips of' in line['measured'] for line in ista2[1:-2])
    assert ista2[-2]['check'].startswith('patch_timm: DeiT-Tiny + ISTA2') and 'bf16' in ista2[-2]['measured']
    assert ista2[-1]['check'] == "ISTA2's fused C++ kernels in use (float32, float64)"

    trainers = {line['check']: line for line in lines_of(report, 'trainers')}
    assert [c for c, line in trainers.items() if line['status'] == 'PASS'] == [
        'PVTv2: train 2 epochs (fp32: no CUDA)', 'PVTv2: auto-resume (rerun with 3 epochs)',
        'PVTv2: evaluate with the banks: main.py --eval --dist-eval',
        'PVTv2: rebuild the banks from the training images, evaluate with them']
    assert 'pvt_v2_b0_ista2_bank.py' in trainers['PVTv2: train 2 epochs (fp32: no CUDA)']['note']
    assert 'rows queued' in trainers['PVTv2: evaluate with the banks: main.py --eval --dist-eval']['measured']
    skipped = [line for line in trainers.values() if line['status'] == 'SKIP']
    assert len(skipped) == 3 and all(line['note'] for line in skipped)
    scaler = trainers['PVTv2: grad scaler state survives the resume']['note']
    assert 'CUDA-only' in scaler and 'the probe ran in the resumed process' in scaler
    group = trainers['PVTv2: process group (NCCL on CUDA, even for one process)']['note']
    assert 'a CPU run joins no group with one process' in group

    speed = lines_of(report, 'speed')  # 3 CIFAR pairs x (time, peak memory, saved memory); targets never asserted
    assert len(speed) == 9 and all(line['status'] == 'SKIP' and not line['asserted'] for line in speed)
    assert all(line['measured'].endswith('img/s)') for line in speed if 'train step' in line['check'])
    assert all(line['measured'].endswith(' MiB)') for line in speed if 'saved for backward' in line['check'])

    timm = lines_of(report, 'timm')
    assert [line['status'] for line in timm] == ['PASS', 'SKIP', 'PASS', 'SKIP', 'PASS', 'SKIP']
    assert 'ms)' in timm[1]['measured'] and all(not line['asserted'] for line in timm[1::2])

    out = proc.stdout
    assert 'Preflight: what the GPU paths need' in out and 'Trainers through their real launchers' in out
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


# A stand-in for a part's process: `python -c FAKE_PART LINES BEHAVIOUR` reports one PASS line, then exits
# ('exit'), aborts ('abort': SIGABRT, as a crash in native code) or hangs with a child of its own ('hang').
FAKE_PART = """
import json, os, subprocess, sys, time
lines, behaviour = sys.argv[1:]
part = os.path.basename(lines).partition('.')[0]
with open(lines, 'a') as f:
    f.write(json.dumps({'part': part, 'check': 'first check', 'status': 'PASS'}) + '\\n')
print('working', flush=True)
if behaviour == 'abort':
    os.abort()
if behaviour == 'hang':
    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
    time.sleep(600)
"""


@pytest.fixture
def fake_parts(gpu_check, monkeypatch):
    """Each part's process replaced by FAKE_PART, behaving as the dict this returns says (default 'exit')."""
    behaviours = {}

    def command(part, args, lines):
        return [sys.executable, '-c', FAKE_PART, lines, behaviours.get(part, 'exit')]

    monkeypatch.setattr(gpu_check, 'worker_command', command)
    return behaviours


def test_a_crashing_part_fails_and_the_others_still_run(gpu_check, fake_parts, tmp_path, capsys):
    fake_parts['ista2'] = 'abort'
    args = gpu_check.parse_args(['--device', 'cpu', '--quick', '--parts', 'ista2', 'timm', '--workdir', str(tmp_path),
                                 '--json', str(tmp_path / 'r.json')])
    assert gpu_check.run(args) == 1
    lines = json.loads((tmp_path / 'r.json').read_text())['lines']
    assert [(line['part'], line['status']) for line in lines] == [
        ('preflight', 'PASS'), ('ista2', 'PASS'), ('ista2', 'FAIL'), ('timm', 'PASS')]
    crash = lines[2]
    assert crash['measured'] == 'crashed' and 'signal 6' in crash['note']
    assert str(tmp_path / 'ista2.log') in crash['note']
    assert 'working' in crash['traceback'] and 'working' in (tmp_path / 'ista2.log').read_text()
    assert f'kept in {tmp_path}' in capsys.readouterr().out


def test_a_part_past_its_budget_is_stopped_with_its_children(gpu_check, fake_parts, tmp_path):
    fake_parts['preflight'] = 'hang'
    args = gpu_check.parse_args(['--device', 'cpu', '--quick', '--parts', 'ista2', '--budget', '1',
                                 '--workdir', str(tmp_path), '--json', str(tmp_path / 'r.json')])
    start = time.time()
    assert gpu_check.run(args) == 1
    assert time.time() - start < 60
    lines = json.loads((tmp_path / 'r.json').read_text())['lines']
    assert [(line['part'], line['status']) for line in lines] == [
        ('preflight', 'PASS'), ('preflight', 'FAIL'), ('ista2', 'SKIP')]
    assert lines[1]['measured'] == 'over its time'
    assert 'stopped after 1 s, when the budget was spent' in lines[1]['note']
    assert 'over the budget: needs about' in lines[2]['note'] and '--parts ista2' in lines[2]['note']


def test_parts_that_do_not_fit_the_budget_are_skipped_and_say_so(gpu_check, fake_parts, tmp_path):
    args = gpu_check.parse_args(['--device', 'cpu', '--quick', '--budget', '20', '--workdir', str(tmp_path),
                                 '--json', str(tmp_path / 'r.json')])
    assert gpu_check.run(args) == 0  # skips are no failures
    report = json.loads((tmp_path / 'r.json').read_text())
    ran = [line['part'] for line in report['lines'] if line['status'] == 'PASS']
    skipped = [line['part'] for line in report['lines'] if line['status'] == 'SKIP']
    assert ran == ['preflight'] and skipped == ['ista2', 'trainers', 'speed', 'timm']
    assert report['estimates']['ista2'] > 20 and '(budget 20 s: met)' in report['header']


def test_a_failed_launch_fails_its_step_and_skips_the_rest(gpu_check, monkeypatch, tmp_path):
    def fail(backbone, job, nproc=1, *, log, show=False, timeout=None):
        raise launch.LaunchError(f'torchrun ... exited with status 1; its output is in {log}')

    monkeypatch.setattr(launch, 'run', fail)
    args = gpu_check.parse_args(['--device', 'cpu', '--quick', '--backbones', 'swin', '--workdir', str(tmp_path)])
    report = gpu_check.Report()
    gpu_check.run_part(report, 'trainers', torch.device('cpu'), args)
    lines = report.lines
    assert [line.status for line in lines] == ['FAIL'] + ['SKIP'] * 6  # the first backbone rebuilds its banks too
    assert 'LaunchError' in lines[0].measured and str(tmp_path / 'swin' / 'train.log') in lines[0].note
    assert all(line.note == 'an earlier step failed' for line in lines[1:])


def test_the_comparison_holds_the_device_winners_and_tells_near_ties_from_wrong_winners(gpu_check, monkeypatch):
    with gpu_check.default_dtype(torch.float64):
        ref = gpu_check.Reference(gpu_check.SMALL_CASES[0])
        out, _, flips = ref.at(ref.winners)
        assert flips == 0 and out is ref.out
        assert torch.allclose(ref._run(ref.winners)[0], ref.out, atol=1e-12)  # mix_at = the module = the loop
        top2 = ref.scores.topk(2, -1)  # (m, T, h, 2)
        gap = top2.values[..., 0] - top2.values[..., 1]
        token = torch.unravel_index(gap.argmax(), gap.shape)  # the clearest winner, swapped for its runner-up
        winners = ref.winners.clone()
        winners[token] = top2.indices[token][1]
        out, _, flips = ref.at(winners)
        assert flips == 1 and not torch.allclose(out, ref.out, atol=1e-6)
        relative_gap = float(gap[token] / ref.scores[ref.scores.isfinite()].abs().max())
        for tolerance, wrong in ((0.99 * relative_gap, 1), (1.01 * relative_gap, 0)):
            monkeypatch.setitem(gpu_check.WINNER_TOL, torch.float32, tolerance)
            assert ref.wrong_winners(winners, torch.float32) == wrong


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message shown without a GPU')
def test_without_a_gpu_the_default_run_stops_and_names_the_smoke_mode(gpu_check, capsys):
    assert gpu_check.main(['--parts', 'ista2']) == 2
    assert '--device cpu --quick' in capsys.readouterr().err
