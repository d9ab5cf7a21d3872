"""The same rules in the three trainers, through their own command lines (one process, no launcher):
a user's mistake is one line on stderr and exit status 2, no traceback; a run no longer than its
warm-up trains with a warning; checkpoints get the file mode of the other outputs."""
import os
import stat
import subprocess
import sys

import pytest

from tests.conftest import ROOT, trainer_env

PVT = ['main.py', '--config', 'configs/pvt_v2_ista2/pvt_v2_b0_ista2.py', '--input-size', '32', '--num_workers', '0']
SWIN = ['main.py', '--cfg', 'configs/swin_ista2/swin_tiny_ista2_patch4_window7_224.yaml', '--opts', 'DATA.IMG_SIZE',
        '32', 'MODEL.SWIN.WINDOW_SIZE', '4', 'MODEL.SWIN.EMBED_DIM', '24', 'MODEL.SWIN.DEPTHS', '[2, 2]',
        'MODEL.SWIN.NUM_HEADS', '[2, 4]', 'DATA.NUM_WORKERS', '0']
CVT = ['tools/train.py', '--cfg', 'experiments/imagenet/cvt_ista2/cvt-13-ista2-224x224.yaml', 'TRAIN.IMAGE_SIZE',
       '[32, 32]', 'TEST.IMAGE_SIZE', '[32, 32]', 'WORKERS', '0', 'MODEL.SPEC.DIM_EMBED', '[16, 32, 48]',
       'MODEL.SPEC.NUM_HEADS', '[1, 1, 2]', 'MODEL.SPEC.DEPTH', '[1, 1, 2]']


def pvt(data, out, *flags, opts=()):
    return 'PVT/classification', [*PVT, '--data-path', data, '--output_dir', out, '--batch-size', '8', *flags]


def swin(data, out, *flags, opts=()):
    return 'SWIN/classification', [*SWIN[:3], '--data-path', data, '--output', out, '--batch-size', '8', *flags,
                                   *SWIN[3:], *opts]


def cvt(data, out, *flags, opts=()):
    return 'CVT/classification', [*CVT, 'DATASET.ROOT', data, 'OUTPUT_DIR', out, 'TRAIN.BATCH_SIZE_PER_GPU', '8',
                                  *opts]


TRAINERS = {'pvt': pvt, 'swin': swin, 'cvt': cvt}
# per trainer: (flags, opts) that make the mistake, and what the message must name
MISTAKES = {
    'batch size 0': {'pvt': ((['--batch-size', '0'], []), '--batch-size 0: must be an integer >= 1'),
                     'swin': ((['--batch-size', '0'], []), 'DATA.BATCH_SIZE (--batch-size) 0: must be an integer >= 1'),
                     'cvt': (([], ['TRAIN.BATCH_SIZE_PER_GPU', '0']), 'TRAIN.BATCH_SIZE_PER_GPU 0: must be an integer'
                                                                      ' >= 1')},
    'negative workers': {'pvt': ((['--num_workers', '-1'], []), '--num_workers -1: must be an integer >= 0'),
                         'swin': (([], ['DATA.NUM_WORKERS', '-1']), 'DATA.NUM_WORKERS -1: must be an integer >= 0'),
                         'cvt': (([], ['WORKERS', '-1']), 'WORKERS -1: must be an integer >= 0')},
    'missing checkpoint': {'pvt': ((['--resume', '/no/such.pth'], []), "--resume '/no/such.pth': no such file"),
                           'swin': ((['--resume', '/no/such.pth'], []), "--resume '/no/such.pth': no such file"),
                           'cvt': (([], ['TRAIN.CHECKPOINT', '/no/such.pth']),
                                   "TRAIN.CHECKPOINT '/no/such.pth': no such file")},
}


def execute(cwd, args):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT / cwd, env=trainer_env(), capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize('name', TRAINERS)
@pytest.mark.parametrize('mistake', MISTAKES)
def test_a_mistake_is_one_line_and_exit_status_2(mistake, name, tiny_data, tmp_path):
    (flags, opts), message = MISTAKES[mistake][name]
    code, stdout, stderr = execute(*TRAINERS[name](tiny_data, str(tmp_path / 'out'), *flags, opts=opts))
    assert code == 2, stdout[-2000:] + stderr[-2000:]
    assert 'Traceback' not in stderr and 'Epoch: [0]' not in stdout
    assert f'error: {message}' in stderr.splitlines()[-1]


@pytest.mark.parametrize('name, config', [('pvt', 'configs/pvt_v2_b0.py'), ('swin', 'configs/swin_tiny.yaml'),
                                          ('cvt', 'experiments/cvt-13.yaml')])
def test_a_missing_config_file_lists_the_configs_that_exist(name, config, tiny_data, tmp_path):
    cwd, args = TRAINERS[name](tiny_data, str(tmp_path / 'out'))
    args[args.index(next(a for a in args if a.startswith(('configs/', 'experiments/'))))] = config
    code, _, stderr = execute(cwd, args)
    assert code == 2 and 'Traceback' not in stderr
    line = stderr.splitlines()[-1]
    assert f"config file '{config}' does not exist (paths are relative to the current folder" in line
    expected = {'pvt': 'configs/pvt_v2_ista2/pvt_v2_b0.py', 'cvt': 'experiments/imagenet/cvt_ista2/cvt-13-224x224.yaml',
                'swin': 'configs/swin_ista2/swin_tiny_patch4_window7_224.yaml'}[name]
    assert expected in line


@pytest.mark.parametrize('name', TRAINERS)
def test_a_run_within_the_warmup_warns_and_checkpoints_are_readable_by_others(name, tiny_data, tmp_path):
    warmup = {'pvt': (['--epochs', '1', '--warmup-epochs', '2'], []),
              'swin': ([], ['TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '2']),
              'cvt': ([], ['TRAIN.END_EPOCH', '1', 'TRAIN.LR_SCHEDULER.ARGS.warmup_epochs', '2'])}[name]
    out = tmp_path / 'out'
    old = os.umask(0o022)
    try:
        code, stdout, stderr = execute(*TRAINERS[name](tiny_data, str(out), *warmup[0], opts=warmup[1]))
    finally:
        os.umask(old)
    assert code == 0, stdout[-2000:] + stderr[-2000:]
    assert 'the whole run stays in the linear warm-up' in stdout
    files = [p for p in out.rglob('*') if p.is_file()]
    assert any(p.suffix == '.pth' for p in files) and any(p.suffix in ('.txt', '.json', '.yaml') for p in files)
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


@pytest.mark.parametrize('name', TRAINERS)
def test_the_bank_command_names_what_it_needs(name, tiny_data, tmp_path):
    """A model without banks, no checkpoint, and (PVT, Swin) a second mode at once: each one line, exit status 2."""
    command = {'pvt': '--rebuild-bank', 'swin': '--rebuild-bank', 'cvt': 'bash run.sh -t rebuild_bank'}[name]
    option = {'pvt': "--eval-align or ista2_args['eval_align']"}.get(name, 'MODEL.ISTA2.EVAL_ALIGN')
    bank = {'pvt': (['--eval-align', 'bank'], []), 'swin': ([], ['MODEL.ISTA2.EVAL_ALIGN', 'bank']),
            'cvt': ([], ['MODEL.ISTA2.EVAL_ALIGN', 'bank'])}[name]
    no_checkpoint = {'pvt': 'an --output_dir holding checkpoint.pth', 'swin': 'a run folder holding ckpt.pth',
                     'cvt': 'a run folder holding model_best.pth'}[name]
    flags = ['--rebuild-bank'] if name != 'cvt' else []
    cases = [((flags, []), f"{command}: this model has no ISTA2 layer with eval_align='bank'; set {option} to bank"),
             ((flags + bank[0], bank[1]), f'{command} needs a checkpoint: ')]
    if name != 'cvt':
        cases.append(((flags + ['--eval'], []), '--eval'))
    for (more_flags, opts), message in cases:
        cwd, args = TRAINERS[name](tiny_data, str(tmp_path / 'out'), *more_flags, opts=opts)
        if name == 'cvt':
            args[0] = 'tools/rebuild_bank.py'
        code, stdout, stderr = execute(cwd, args)
        assert code == 2 and 'Traceback' not in stderr, stdout[-2000:] + stderr[-2000:]
        assert message in stderr.splitlines()[-1]
        if 'needs a checkpoint' in message:
            assert no_checkpoint in stderr.splitlines()[-1]
