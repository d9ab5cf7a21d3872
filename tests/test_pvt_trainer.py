"""PVT main.py end to end on a tiny dataset: one process and torchrun with 2 (gloo), train/eval/resume, errors."""
import json
import os

import pytest
import torch

from tests.conftest import run

CWD = 'PVT/classification'
B0, B0_ISTA2 = 'configs/pvt_v2_ista2/pvt_v2_b0.py', 'configs/pvt_v2_ista2/pvt_v2_b0_ista2.py'
FAST = ['--input-size', '32', '--batch-size', '8', '--num_workers', '0', '--warmup-epochs', '0']


def train_args(config, data, out, epochs, *extra):
    return ['main.py', '--config', config, '--data-path', data, '--output_dir', out, '--epochs', epochs, *FAST, *extra]


def log_epochs(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line)['epoch'] for line in f]


def test_train_then_rerun_resumes_then_eval(tiny_data, tmp_path):
    out = str(tmp_path / 'run')
    first = run(CWD, train_args(B0_ISTA2, tiny_data, out, 1, '--drop-path', '0.05'))
    assert 'the command line value 0.05 wins' in first
    assert sorted(os.listdir(out)) == ['checkpoint.pth', 'log.txt', 'model_best.pth']  # no temporary files left
    ckpt = torch.load(os.path.join(out, 'checkpoint.pth'), weights_only=True)
    assert set(ckpt) == {'model', 'optimizer', 'lr_scheduler', 'epoch', 'scaler', 'args', 'max_accuracy'}
    assert ckpt['epoch'] == 0 and ckpt['args']['drop_path'] == 0.05
    assert ckpt['args']['ista2_args']['ista2_method'] == 'v'
    assert any('ista2.v_norm_layer' in k for k in ckpt['model'])

    second = run(CWD, train_args(B0_ISTA2, tiny_data, out, 2))
    assert 'resuming from it' in second and 'at epoch 1' in second
    assert log_epochs(out) == [0, 1]

    evaluated = run(CWD, ['main.py', '--eval', '--config', B0_ISTA2, '--resume', os.path.join(out, 'checkpoint.pth'),
                          '--data-path', tiny_data, *FAST])
    assert '* Acc@1' in evaluated and 'on the 40 test images' in evaluated


def test_two_processes_train_resume_and_dist_eval_counting_each_image_once(tiny_data, tmp_path):
    out = str(tmp_path / 'run')
    run(CWD, train_args(B0, tiny_data, out, 1), nproc=2)
    assert log_epochs(out) == [0]
    assert 'Resumed from' in run(CWD, train_args(B0, tiny_data, out, 2), nproc=2)
    assert log_epochs(out) == [0, 1]
    ckpt = os.path.join(out, 'checkpoint.pth')
    eval_args = ['main.py', '--eval', '--config', B0, '--resume', ckpt, '--data-path', tiny_data, *FAST]
    distributed = run(CWD, eval_args + ['--dist-eval'], nproc=2)
    single = run(CWD, eval_args, nproc=1)
    line = [x for x in distributed.splitlines() if 'Accuracy of the network on the 40 test images' in x]
    assert line and line[0] in single  # the baseline does not depend on how images are batched


def test_eval_without_a_checkpoint_is_an_error(tiny_data):
    # the other bad inputs are rows of tests/test_reliability.py
    output = run(CWD, ['main.py', '--eval', '--config', B0, '--data-path', tiny_data, *FAST], expect_ok=False)
    assert '--eval needs a checkpoint' in output


def test_checkpoint_of_another_architecture_is_refused(tiny_data, tmp_path):
    out = str(tmp_path / 'run')
    run(CWD, train_args(B0, tiny_data, out, 1))
    output = run(CWD, ['main.py', '--eval', '--config', 'configs/pvt_v2_ista2/pvt_v2_b2.py', '--resume',
                       os.path.join(out, 'checkpoint.pth'), '--data-path', tiny_data, *FAST], expect_ok=False)
    assert 'does not fit this model' in output and 'another shape' in output


@pytest.mark.parametrize('flags, message', [
    (['--dist_url', 'tcp://10.0.0.1:23456'], 'only env:// is supported; launch with torchrun'),
    (['--world_size', '8'], '--world_size 8, but WORLD_SIZE is 1'),
    (['--resplit'], '--resplit only acts with augmentation splits'),
    (['--inat-category', 'genus'], '--inat-category genus only applies to the iNaturalist data sets'),
])
def test_flags_that_would_do_nothing_are_refused(tiny_data, tmp_path, flags, message):
    assert message in run(CWD, train_args(B0, tiny_data, str(tmp_path / 'run'), 1, *flags), expect_ok=False)
    assert not os.path.exists(tmp_path / 'run')
