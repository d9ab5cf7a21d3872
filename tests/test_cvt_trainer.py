"""CvT run.sh end to end on a tiny dataset: -g 1 and -g 2 (gloo), train/test/resume, errors."""
import os

import torch

from tests.conftest import free_port, run

CWD = 'CVT/classification'
ISTA2 = 'experiments/imagenet/cvt_ista2/cvt-13-ista2-224x224.yaml'
SMALL = ['TRAIN.IMAGE_SIZE', '[32, 32]', 'TEST.IMAGE_SIZE', '[32, 32]', 'TRAIN.BATCH_SIZE_PER_GPU', '8',
         'TEST.BATCH_SIZE_PER_GPU', '12', 'WORKERS', '0', 'MODEL.SPEC.DIM_EMBED', '[16, 32, 48]',
         'MODEL.SPEC.NUM_HEADS', '[1, 1, 2]', 'MODEL.SPEC.DEPTH', '[1, 1, 2]']


def run_sh(job, gpus, data, out, *opts, expect_ok=True):
    return run(CWD, ['run.sh', '-g', gpus, '-t', job, '-p', free_port(), '--cfg', ISTA2, 'DATASET.ROOT', data,
                     'OUTPUT_DIR', out, *SMALL, *opts], launcher='bash', expect_ok=expect_ok)


def test_train_resume_and_test_one_process(tiny_data, tmp_path):
    out = str(tmp_path / 'out')
    run_sh('train', 1, tiny_data, out, 'TRAIN.END_EPOCH', '1')
    run_dir = os.path.join(out, 'imagenet', 'cvt-13-ista2-224x224')
    files = set(os.listdir(run_dir))
    assert {'checkpoint.pth', 'model_best.pth', 'final_state.pth', 'config.yaml', 'cls_cvt.py'} <= files
    assert any(f.startswith('events.out.tfevents') for f in files) and any(f.startswith('train_') for f in files)
    ckpt = torch.load(os.path.join(run_dir, 'checkpoint.pth'), weights_only=True)
    assert set(ckpt) == {'epoch', 'model', 'state_dict', 'perf', 'optimizer', 'lr_scheduler', 'scaler'}
    assert ckpt['epoch'] == 1 and ckpt['model'] == 'cls_cvt_ista2' and 'stage2.bg_token' in ckpt['state_dict']

    assert 'resuming from' in run_sh('train', 1, tiny_data, out, 'TRAIN.END_EPOCH', '2')
    assert torch.load(os.path.join(run_dir, 'checkpoint.pth'), weights_only=True)['epoch'] == 2

    # a training checkpoint and the bare final state both load, and give the same result
    results = [run_sh('test', 1, tiny_data, out, 'TEST.MODEL_FILE', os.path.join(run_dir, f))
               for f in ('checkpoint.pth', 'final_state.pth')]
    lines = [[x.split('=> TEST:')[1] for x in r.splitlines() if '=> TEST:' in x][-1] for r in results]
    assert lines[0] == lines[1] and 'evaluated 40 images' in results[0]


def test_two_processes_train_resume_and_test(tiny_data, tmp_path):
    out = str(tmp_path / 'out')
    run_sh('train', 2, tiny_data, out, 'TRAIN.END_EPOCH', '1')
    run_dir = os.path.join(out, 'imagenet', 'cvt-13-ista2-224x224')
    assert sum(f.startswith('train_') for f in os.listdir(run_dir)) == 2  # one log per rank
    assert 'resuming from' in run_sh('train', 2, tiny_data, out, 'TRAIN.END_EPOCH', '2')
    tested = run_sh('test', 2, tiny_data, out, 'TEST.MODEL_FILE', os.path.join(run_dir, 'final_state.pth'))
    assert 'evaluated 40 images' in tested


def test_wrong_checkpoint_fails_loudly(tiny_data, tmp_path):
    out = str(tmp_path / 'out')
    run_sh('train', 1, tiny_data, out, 'TRAIN.END_EPOCH', '1')
    final = os.path.join(out, 'imagenet', 'cvt-13-ista2-224x224', 'final_state.pth')
    output = run_sh('test', 1, tiny_data, out, 'TEST.MODEL_FILE', final, 'MODEL.SPEC.DEPTH', '[1, 1, 3]',
                    expect_ok=False)
    assert 'does not fit this model' in output and 'stage2.blocks.2' in output
    output = run_sh('train', 1, tiny_data, out, 'TRAIN.LRR', '0.1', expect_ok=False)
    assert "unknown config key 'TRAIN.LRR'" in output and "did you mean 'LR'" in output
