"""Swin main.py end to end on a tiny dataset: one process and torchrun with 2 (gloo), train/eval/resume, errors."""
import json
import os

import torch

from tests.conftest import run

CWD = 'SWIN/classification'
BASE = 'configs/swin_ista2/swin_tiny_patch4_window7_224.yaml'
ISTA2 = 'configs/swin_ista2/swin_tiny_ista2_patch4_window7_224.yaml'
SMALL = ['DATA.IMG_SIZE', '32', 'MODEL.SWIN.WINDOW_SIZE', '4', 'MODEL.SWIN.EMBED_DIM', '24', 'MODEL.SWIN.DEPTHS',
         '[2, 2]', 'MODEL.SWIN.NUM_HEADS', '[2, 4]', 'TRAIN.WARMUP_EPOCHS', '0', 'DATA.NUM_WORKERS', '0']


def args(config, data, out, epochs, *extra, opts=()):
    return ['main.py', '--cfg', config, '--data-path', data, '--output', out, '--batch-size', '8', *extra,
            '--opts', *SMALL, 'TRAIN.EPOCHS', epochs, *opts]


def test_train_rerun_resumes_eval_and_throughput(tiny_data, tmp_path):
    out = str(tmp_path / 'out')
    run(CWD, args(ISTA2, tiny_data, out, 1))
    run_dir = os.path.join(out, 'swin_tiny_ista2_patch4_window7_224', 'default')
    assert sorted(os.listdir(run_dir)) == ['ckpt.pth', 'config.json', 'log_rank0.txt', 'model_best.pth']
    with open(os.path.join(run_dir, 'config.json')) as f:
        assert json.load(f)['MODEL']['ISTA2']['REP_TKN_TYPE'] == 'mean'
    ckpt = torch.load(os.path.join(run_dir, 'ckpt.pth'), weights_only=True)
    assert set(ckpt) == {'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'scaler', 'epoch', 'config'}
    assert ckpt['config']['MODEL']['NUM_CLASSES'] == 10

    assert 'continuing at epoch 1' in run(CWD, args(ISTA2, tiny_data, out, 2))
    assert torch.load(os.path.join(run_dir, 'ckpt.pth'), weights_only=True)['epoch'] == 1

    evaluated = run(CWD, args(ISTA2, tiny_data, out, 2, '--eval', '--resume', os.path.join(run_dir, 'ckpt.pth')))
    assert 'Accuracy of the network on the 40 test images' in evaluated and 'Start training' not in evaluated
    assert 'throughput' in run(CWD, args(ISTA2, tiny_data, out, 2, '--throughput'))


def test_accumulation_and_gradient_checkpointing(tiny_data, tmp_path):
    output = run(CWD, args(ISTA2, tiny_data, str(tmp_path / 'out'), 1, '--accumulation-steps', '2',
                           '--use-checkpoint'))
    assert 'USE_CHECKPOINT: true' in output and 'ACCUMULATION_STEPS: 2' in output
    assert 'Epoch: [0] [9/10]' in output  # 80 images / batch 8: 10 iterations, 5 optimizer steps


def test_baseline_and_ista2_runs_never_share_a_folder(tiny_data, tmp_path):
    out = str(tmp_path / 'out')
    output = run(CWD, args(BASE, tiny_data, out, 1, '--eval'), expect_ok=False)
    assert '--eval needs a checkpoint' in output
    run(CWD, args(ISTA2, tiny_data, out, 1))
    assert 'auto resuming' not in run(CWD, args(BASE, tiny_data, out, 1))
    assert sorted(os.listdir(out)) == ['swin_tiny_ista2_patch4_window7_224', 'swin_tiny_patch4_window7_224']


def test_two_processes_train_resume_and_eval(tiny_data, tmp_path):
    out = str(tmp_path / 'out')
    run(CWD, args(ISTA2, tiny_data, out, 1), nproc=2)
    run_dir = os.path.join(out, 'swin_tiny_ista2_patch4_window7_224', 'default')
    assert {'log_rank0.txt', 'log_rank1.txt', 'ckpt.pth'} <= set(os.listdir(run_dir))
    assert 'continuing at epoch 1' in run(CWD, args(ISTA2, tiny_data, out, 2), nproc=2)
    evaluated = run(CWD, args(ISTA2, tiny_data, out, 2, '--eval'), nproc=2)
    assert 'Accuracy of the network on the 40 test images' in evaluated


def test_unsupported_options_are_refused(tiny_data, tmp_path):
    # the other bad inputs are rows of tests/test_reliability.py
    out = str(tmp_path / 'out')
    assert 'not supported here: DATA.ZIP_MODE' in run(CWD, args(ISTA2, tiny_data, out, 1, '--zip'), expect_ok=False)
    refused = run(CWD, args(ISTA2, tiny_data, out, 1, opts=['TRAIN.LAYER_DECAY', '0.9']), expect_ok=False)
    assert 'not supported here: TRAIN.LAYER_DECAY (SimMIM fine-tuning)' in refused
    refused = run(CWD, args(ISTA2, tiny_data, out, 1, '--cache-mode', 'full'), expect_ok=False)
    assert '--cache-mode full caches zipped ImageNet (--zip), which is not supported here' in refused


def test_pretrained_weights_are_resized_to_a_new_window_and_head(tiny_data, tmp_path):
    out = str(tmp_path / 'out')
    run(CWD, args(BASE, tiny_data, out, 1))
    ckpt = os.path.join(out, 'swin_tiny_patch4_window7_224', 'default', 'ckpt.pth')
    # window 2 instead of 4 (smaller relative-position tables), ISTA2 norms that the checkpoint lacks
    output = run(CWD, args(ISTA2, tiny_data, str(tmp_path / 'ft'), 1, '--pretrained', ckpt,
                           opts=['MODEL.SWIN.WINDOW_SIZE', '2']))
    assert 'keys new to this model' in output and 'ista2.q_norm_layer.weight' in output
    assert 'relative_position_bias_table' not in output.split('keys new to this model')[1].splitlines()[0]


def test_an_improvement_between_save_epochs_still_writes_model_best(tiny_data, tmp_path):
    # epochs 1 and 2 with SAVE_FREQ 5: only epoch 2, the last, is a scheduled checkpoint
    output = run(CWD, args(BASE, tiny_data, str(tmp_path / 'out'), 3, opts=['SAVE_FREQ', '5', 'TRAIN.START_EPOCH',
                                                                              '1']))
    assert 0 <= output.find('model_best.pth saved') < output.find('ckpt.pth saved')
