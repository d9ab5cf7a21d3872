"""Crash safety and hostile input, for each of the three trainers (the promises of docs/reliability.md).

Every trainer runs a small ISTA2 model on the tiny generated dataset, on the CPU, through its real
command line. Each fault or bad input must end with a message naming the problem and leave the
checkpoints already in the output folder byte for byte as they were.
"""
import hashlib
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.checkpoint import load, save_atomic
from tests.conftest import ROOT, command, execute, free_port, trainer_env


class Pvt:
    cwd = 'PVT/classification'
    config = 'configs/pvt_v2_ista2/pvt_v2_b0_ista2.py'
    small = ['--input-size', '32', '--batch-size', '4', '--num_workers', '0', '--warmup-epochs', '0']
    bad_options = {
        'unknown config key': ('config', 'drop_pth=0.1', "unknown config key 'drop_pth' (did you mean 'drop_path'?)"),
        'config value of the wrong type': ('config', "drop_path='0.1'", "drop_path='0.1' has type str; expected float"),
        'invalid ISTA2 option': ('config', "ista2_args=dict(rep_tkn_type='max', ista2_method='v', attn_inter_topk=1)",
                                 "invalid rep_tkn_type='max'"),
        'batch larger than the dataset': ('flags', ['--batch-size', '1000'], 'is larger than the 80 training images'),
    }

    def train(self, data, out, epochs, nproc=None, extra=(), port=None, max_restarts=0, config=None):
        return command(['main.py', '--config', config or self.config, '--data-path', data, '--output_dir', out,
                        '--epochs', epochs, *self.small, *extra], nproc, port=port, max_restarts=max_restarts)

    def evaluate(self, data, checkpoint):
        return command(['main.py', '--eval', '--config', self.config, '--resume', checkpoint, '--data-path', data,
                        *self.small])

    def bad_train(self, case, data, out, tmp_path):
        kind, value, _ = self.bad_options[case]
        if kind == 'flags':
            return self.train(data, out, 2, extra=value)
        config = tmp_path / 'bad_config.py'
        config.write_text(f"_base_ = '{ROOT / self.cwd / self.config}'\ncfg = dict({value})\n")
        return self.train(data, out, 2, config=config)

    def diverging(self, data, out):
        """Two warm-up epochs at 1e-6, then a learning rate that blows the weights up."""
        return self.train(data, out, 4, extra=['--warmup-epochs', '1', '--warmup-lr', '1e-6', '--lr', '1e9'])

    @staticmethod
    def checkpoint(out):
        return Path(out) / 'checkpoint.pth'

    def final_weights(self, out):
        return load(self.checkpoint(out))['model']


class Swin:
    cwd = 'SWIN/classification'
    config = 'configs/swin_ista2/swin_tiny_ista2_patch4_window7_224.yaml'
    small = ['DATA.IMG_SIZE', '32', 'MODEL.SWIN.WINDOW_SIZE', '4', 'MODEL.SWIN.EMBED_DIM', '24', 'MODEL.SWIN.DEPTHS',
             '[2, 2]', 'MODEL.SWIN.NUM_HEADS', '[2, 4]', 'TRAIN.WARMUP_EPOCHS', '0', 'DATA.NUM_WORKERS', '0']
    bad_options = {
        'unknown config key': ('opts', ['MODEL.ISTA2.QK_NROM', 'True'],
                               "unknown config key 'MODEL.ISTA2.QK_NROM': no 'QK_NROM' under MODEL.ISTA2 "
                               "(did you mean 'QK_NORM'?)"),
        'config value of the wrong type': ('opts', ['MODEL.DROP_PATH_RATE', 'abc'], 'Type mismatch'),
        'invalid ISTA2 option': ('opts', ['MODEL.ISTA2.REP_TKN_TYPE', 'max'], "invalid rep_tkn_type='max'"),
        'batch larger than the dataset': ('flags', ['--batch-size', '1000'], 'is larger than the 80 training images'),
    }

    def train(self, data, out, epochs, nproc=None, flags=(), opts=(), port=None, max_restarts=0):
        return command(['main.py', '--cfg', self.config, '--data-path', data, '--output', out, '--batch-size', '4',
                        *flags, '--opts', *self.small, 'TRAIN.EPOCHS', epochs, *opts], nproc, port=port,
                       max_restarts=max_restarts)

    def evaluate(self, data, checkpoint):
        return command(['main.py', '--eval', '--cfg', self.config, '--data-path', data, '--output',
                        Path(checkpoint).parent / 'eval', '--batch-size', '4', '--resume', checkpoint,
                        '--opts', *self.small])

    def bad_train(self, case, data, out, tmp_path):
        kind, value, _ = self.bad_options[case]
        return self.train(data, out, 2, **{kind: value})

    def diverging(self, data, out):
        """One epoch at the usual learning rate, then one a trillion times larger."""
        return self.train(data, out, 3, opts=['TRAIN.LR_SCHEDULER.NAME', 'step', 'TRAIN.LR_SCHEDULER.DECAY_EPOCHS',
                                              '1', 'TRAIN.LR_SCHEDULER.DECAY_RATE', '1e12'])

    @staticmethod
    def checkpoint(out):
        return Path(out) / 'swin_tiny_ista2_patch4_window7_224' / 'default' / 'ckpt.pth'

    def final_weights(self, out):
        return load(self.checkpoint(out))['model']


class Cvt:
    cwd = 'CVT/classification'
    config = 'experiments/imagenet/cvt_ista2/cvt-13-ista2-224x224.yaml'
    small = ['TRAIN.IMAGE_SIZE', '[32, 32]', 'TEST.IMAGE_SIZE', '[32, 32]', 'TRAIN.BATCH_SIZE_PER_GPU', '4',
             'TEST.BATCH_SIZE_PER_GPU', '12', 'WORKERS', '0', 'MODEL.SPEC.DIM_EMBED', '[16, 32, 48]',
             'MODEL.SPEC.NUM_HEADS', '[1, 1, 2]', 'MODEL.SPEC.DEPTH', '[1, 1, 2]',
             'TRAIN.LR_SCHEDULER.ARGS.warmup_epochs', '0']
    bad_options = {
        'unknown config key': (['TRAIN.BATCH_SIZE_PER_GP', '8'], "unknown config key 'TRAIN.BATCH_SIZE_PER_GP'"),
        'config value of the wrong type': (['TRAIN.END_EPOCH', 'abc'], 'Type mismatch'),
        'invalid ISTA2 option': (['MODEL.ISTA2.REP_TKN_TYPE', 'max'], "invalid rep_tkn_type='max'"),
        'batch larger than the dataset': (['TRAIN.BATCH_SIZE_PER_GPU', '1000'], 'is larger than the 80 training'),
    }

    def run_sh(self, job, data, out, opts, nproc=1, port=None):
        return command(['run.sh', '-g', nproc, '-t', job, '-p', port or free_port(), '--cfg', self.config,
                        'DATASET.ROOT', data, 'OUTPUT_DIR', out, *self.small, *opts], launcher='bash')

    def train(self, data, out, epochs, nproc=None, opts=(), port=None, max_restarts=None):
        if max_restarts:  # run.sh has no such option: torchrun itself
            return command(['tools/train.py', '--cfg', self.config, 'DATASET.ROOT', data, 'OUTPUT_DIR', out,
                            *self.small, 'TRAIN.END_EPOCH', epochs, *opts], nproc, max_restarts=max_restarts)
        return self.run_sh('train', data, out, ['TRAIN.END_EPOCH', epochs, *opts], nproc or 1, port)

    def evaluate(self, data, checkpoint):
        return self.run_sh('test', data, Path(checkpoint).parent / 'eval', ['TEST.MODEL_FILE', checkpoint])

    def bad_train(self, case, data, out, tmp_path):
        return self.train(data, out, 2, opts=self.bad_options[case][0])

    def diverging(self, data, out):
        """One warm-up epoch at 1e-6, then a learning rate that blows the weights up."""
        return self.train(data, out, 3, opts=['TRAIN.LR', '1e9', 'TRAIN.LR_SCHEDULER.ARGS.warmup_epochs', '1'])

    @staticmethod
    def checkpoint(out):
        return Path(out) / 'imagenet' / 'cvt-13-ista2-224x224' / 'checkpoint.pth'

    def final_weights(self, out):
        return load(self.checkpoint(out).parent / 'final_state.pth')


TRAINERS = {'pvt': Pvt(), 'swin': Swin(), 'cvt': Cvt()}


def checkpoint_digests(out):
    """{relative path: sha256} of every .pth file under `out`."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(out).rglob('*.pth')}


@pytest.fixture(scope='module')
def trained(tiny_data, tmp_path_factory):
    """{trainer: output folder after one epoch in one process}, made on first use."""
    made = {}

    def get(name):
        if name not in made:
            out = tmp_path_factory.mktemp(f'trained-{name}')
            execute(TRAINERS[name].cwd, TRAINERS[name].train(tiny_data, out, 1))
            made[name] = out
        return made[name]
    return get


@pytest.fixture
def existing(trained, tmp_path):
    """A copy of a trained output folder and the digests its checkpoints must keep."""
    def get(name):
        out = tmp_path / 'out'
        shutil.copytree(trained(name), out)
        return out, checkpoint_digests(out)
    return get


# ----------------------------------------------------------------------------------------------
# Faults


def run_killing_rank1(trainer, cmd, trigger='Epoch: [1] [0/'):
    """Run `cmd`; when its output first contains `trigger` (rank 0 is inside epoch 1), SIGKILL the
    rank-1 worker. Returns (exit code, output)."""
    proc = subprocess.Popen(cmd, cwd=ROOT / trainer.cwd, env=trainer_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, killed = [], False
    for line in proc.stdout:
        lines.append(line)
        if not killed and trigger in line:
            os.kill(worker_pid(proc.pid, rank=1), signal.SIGKILL)
            killed = True
    proc.wait(timeout=300)
    assert killed, f'never saw {trigger!r}:\n' + ''.join(lines)[-3000:]
    return proc.returncode, ''.join(lines)


def worker_pid(launcher_pid, rank):
    """The pid of the launcher's child process that torchrun started as RANK=rank."""
    children = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            if int(stat.read_text().rsplit(')', 1)[1].split()[1]) == launcher_pid:
                children.append(stat.parent)
        except (OSError, IndexError):  # a process that just ended
            continue
    for proc in children:
        if f'RANK={rank}'.encode() in (proc / 'environ').read_bytes().split(b'\0'):
            return int(proc.name)
    raise AssertionError(f'no worker with RANK={rank} among the children {[p.name for p in children]}')


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:3]}'


@pytest.mark.parametrize('name', TRAINERS)
def test_a_killed_worker_costs_at_most_the_current_epoch(name, tiny_data, tmp_path):
    """kill -9 of one of two processes inside epoch 1: rerunning the same command resumes at
    epoch 1 and ends with the uninterrupted run's weights, bit for bit; with torchrun
    --max-restarts 1 the restarted group does the same by itself."""
    trainer = TRAINERS[name]
    uninterrupted = tmp_path / 'uninterrupted'
    execute(trainer.cwd, trainer.train(tiny_data, uninterrupted, 2, nproc=2))
    reference = trainer.final_weights(uninterrupted)

    out = tmp_path / 'killed'
    cmd = trainer.train(tiny_data, out, 2, nproc=2)
    code, output = run_killing_rank1(trainer, cmd)
    assert code != 0, output[-3000:]
    resumed = execute(trainer.cwd, cmd)
    assert 'at epoch 1' in resumed, resumed[-2000:]
    assert_same_weights(trainer.final_weights(out), reference)

    out = tmp_path / 'restarted'
    code, output = run_killing_rank1(trainer, trainer.train(tiny_data, out, 2, nproc=2, max_restarts=1))
    assert code == 0, output[-3000:]
    assert_same_weights(trainer.final_weights(out), reference)


@pytest.mark.parametrize('name', TRAINERS)
def test_a_full_disk_fails_at_the_write_and_keeps_the_last_checkpoint(name, tiny_data, existing):
    trainer = TRAINERS[name]
    out, digests = existing(name)
    size = trainer.checkpoint(out).stat().st_size
    output = execute(trainer.cwd, trainer.train(tiny_data, out, 2), expect_ok=False, max_file_bytes=size // 2)
    assert f'could not write {trainer.checkpoint(out)}: File too large' in output
    assert checkpoint_digests(out) == digests
    assert not [p for p in Path(out).rglob('*.tmp')]  # no partial file left for anyone to trust


@pytest.mark.parametrize('name', TRAINERS)
def test_an_unwritable_output_folder_fails_before_training(name, tiny_data, tmp_path):
    trainer = TRAINERS[name]
    # files up to 16 KiB still work (a config copy in /tmp), the 64 KiB probe in the output folder does not
    output = execute(trainer.cwd, trainer.train(tiny_data, tmp_path / 'out', 1), expect_ok=False,
                     max_file_bytes=16 << 10)
    assert 'cannot be written to (File too large)' in output
    assert 'Epoch: [0]' not in output
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    output = execute(trainer.cwd, trainer.train(tiny_data, blocker / 'out', 1), expect_ok=False)
    assert 'cannot be written to (Not a directory)' in output


@pytest.mark.parametrize('name', TRAINERS)
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(name, tiny_data, tmp_path):
    trainer = TRAINERS[name]
    out = tmp_path / 'out'
    output = execute(trainer.cwd, trainer.diverging(tiny_data, out), expect_ok=False)
    assert 'not finite' in output or 'loss is nan' in output or 'loss is inf' in output
    assert 'the last checkpoint stays the last good one' in output
    saved = load(trainer.checkpoint(out))  # written before the divergence
    state = saved['state_dict'] if name == 'cvt' else saved['model']
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


STALL_SECOND_CHECKPOINT_WRITE = """
import os, time
_fsync = os.fsync


def fsync(fd):  # test hook: stall the second training-checkpoint write just before it is synced
    name = os.path.basename(os.readlink(f'/proc/self/fd/{fd}'))
    target = name[1:].rsplit('.', 2)[0] if name.endswith('.tmp') else None
    if target in ('checkpoint.pth', 'ckpt.pth') and os.path.exists(
            os.path.join(os.path.dirname(os.readlink(f'/proc/self/fd/{fd}')), target)):
        print('STALLED IN A CHECKPOINT WRITE, pid', os.getpid(), flush=True)
        time.sleep(600)
    _fsync(fd)


os.fsync = fsync
"""


@pytest.mark.parametrize('name', TRAINERS)
def test_a_trainer_killed_inside_a_checkpoint_write_resumes_from_the_previous_one(name, tiny_data, tmp_path):
    trainer = TRAINERS[name]
    hook = tmp_path / 'hook'
    hook.mkdir()
    (hook / 'sitecustomize.py').write_text(STALL_SECOND_CHECKPOINT_WRITE)
    out = tmp_path / 'out'
    cmd = trainer.train(tiny_data, out, 3)
    env = {**trainer_env(), 'PYTHONPATH': str(hook)}
    proc = subprocess.Popen(cmd, cwd=ROOT / trainer.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines, killed = [], False
    for line in proc.stdout:
        lines.append(line)
        if 'STALLED IN A CHECKPOINT WRITE, pid' in line:
            os.kill(int(line.split()[-1]), signal.SIGKILL)  # the process writing: rank 0 under torchrun
            killed = True
    proc.wait(timeout=300)
    # a run that failed before its second checkpoint write would leave no temporary file for a reason of its own
    assert killed and proc.returncode != 0, ''.join(lines)[-3000:]
    assert list(trainer.checkpoint(out).parent.glob('.*.tmp'))  # the interrupted write's file
    saved = load(trainer.checkpoint(out))
    assert saved['epoch'] == (1 if name == 'cvt' else 0)  # the first epoch's checkpoint, intact
    assert 'at epoch 1' in execute(trainer.cwd, cmd)
    assert not list(trainer.checkpoint(out).parent.glob('.*.tmp'))
    assert load(trainer.checkpoint(out))['epoch'] == (3 if name == 'cvt' else 2)


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    writer = ('import sys, torch\nfrom common.checkpoint import save_atomic\n'
              'save_atomic({"epoch": 1, "w": torch.ones(3)}, sys.argv[1])\nprint("saved", flush=True)\n'
              'save_atomic({"epoch": 2, "w": torch.zeros(2 ** 27)}, sys.argv[1])\n')
    proc = subprocess.Popen([sys.executable, '-c', writer, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'saved'
    deadline = time.time() + 60
    while not [p for p in tmp_path.iterdir() if p.suffix == '.tmp' and p.stat().st_size > 0]:
        assert time.time() < deadline and proc.poll() is None, 'the second write never began'
    # the 512 MiB write has begun
    proc.kill()
    proc.wait()
    assert load(path)['epoch'] == 1
    leftovers = [p for p in tmp_path.iterdir() if p.suffix == '.tmp']
    assert leftovers  # the killed write's partial file ...
    save_atomic({'epoch': 3}, path)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint.pth']  # ... is cleared by the next write


# ----------------------------------------------------------------------------------------------
# Hostile input: one test per row of docs/reliability.md


@pytest.mark.parametrize('name', TRAINERS)
@pytest.mark.parametrize('case', list(Pvt.bad_options))
def test_bad_option(case, name, tiny_data, existing, tmp_path):
    trainer = TRAINERS[name]
    out, digests = existing(name)
    output = execute(trainer.cwd, trainer.bad_train(case, tiny_data, out, tmp_path), expect_ok=False)
    assert trainer.bad_options[case][-1] in output
    assert checkpoint_digests(out) == digests


class Payload:
    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return os.system, (f'touch {self.mark}',)


@pytest.mark.parametrize('name', TRAINERS)
@pytest.mark.parametrize('case', ['another architecture', 'truncated', 'pickled code'])
def test_bad_checkpoint(case, name, tiny_data, trained, tmp_path):
    trainer = TRAINERS[name]
    bad = tmp_path / 'bad.pth'
    mark = tmp_path / 'payload-ran'
    if case == 'another architecture':
        torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 10)).state_dict(), bad)
        expected = 'does not fit this model'
    elif case == 'truncated':
        data = trainer.checkpoint(trained(name)).read_bytes()
        bad.write_bytes(data[:len(data) // 2])
        expected = 'not a readable checkpoint (truncated or corrupt?)'
    else:
        torch.save({'model': {}, 'state_dict': {}, 'extra': Payload(mark)}, bad, pickle_module=pickle)
        expected = 'refused to load objects other than tensors and plain data'
    output = execute(trainer.cwd, trainer.evaluate(tiny_data, bad), expect_ok=False)
    assert expected in output and str(bad) in output
    assert not mark.exists()


@pytest.mark.parametrize('name', TRAINERS)
def test_a_busy_master_port_is_named(name, tiny_data, existing):
    trainer = TRAINERS[name]
    out, digests = existing(name)
    with socket.socket() as busy:
        busy.bind(('', 0))
        busy.listen()
        port = busy.getsockname()[1]
        output = execute(trainer.cwd, trainer.train(tiny_data, out, 2, nproc=1, port=port), expect_ok=False)
    assert 'already in use' in output  # torchrun's own message for PVT and Swin, run.sh's for CvT
    assert checkpoint_digests(out) == digests


def broken_dataset(tiny_data, tmp_path, case):
    root = tmp_path / 'data'
    shutil.copytree(tiny_data, root)
    if case == 'empty class folder':
        for image in (root / 'train' / 'dots').iterdir():
            image.unlink()
    elif case == 'train and val with different classes':
        shutil.rmtree(root / 'val' / 'dots')
    elif case == 'corrupt JPEG':
        (root / 'val' / 'dots' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a JPEG')
    elif case == 'non-image file':
        (root / 'train' / 'dots' / 'notes.txt').write_text('a stray file')
    elif case == 'missing dataset path':
        root = tmp_path / 'nowhere'
    return root


DATA_CASES = {  # (trainer, message): the data checks are shared, so each row runs on one trainer, in turn
    'missing dataset path': ('pvt', "is not a folder; expected <root>/train/<class>/*.jpg"),
    'empty class folder': ('swin', 'Found no valid file for the classes dots'),
    'train and val with different classes': ('cvt', "different classes (only in train: ['dots']"),
    'corrupt JPEG': ('pvt', 'cannot read image {root}/val/dots/broken.jpg'),
    'non-image file': ('swin', 'skipped 1 files without an image extension, e.g. {root}/train/dots/notes.txt'),
}


@pytest.mark.parametrize('case', DATA_CASES)
def test_bad_dataset(case, tiny_data, existing, tmp_path):
    name, expected = DATA_CASES[case]
    trainer = TRAINERS[name]
    out, digests = existing(name)
    root = broken_dataset(tiny_data, tmp_path, case)
    ok = case == 'non-image file'  # the policy: skipped with a warning and a count, training goes on
    output = execute(trainer.cwd, trainer.train(root, out, 2), expect_ok=ok)
    assert expected.format(root=root) in output
    if not ok:
        assert checkpoint_digests(out) == digests
