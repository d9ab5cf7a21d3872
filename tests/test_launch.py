"""The backbone registry and the launcher: every backbone's commands (training, and evaluation under
each protocol) are what its front end accepts, read by the front end's own parser and config loader
without training; one real round trip (CvT: train one epoch, evaluate at batch 1) returns the
structured results, with the path of the final weights; a failing run names what failed."""
import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from torch.distributed.run import get_args_parser as torchrun_parser

from common import launch
from common.backbones import BACKBONES, imported
from common.trainer import PROTOCOLS
from tests.conftest import ROOT, trainer_env

SETTINGS = dict(data='/data/tiny', output='/runs/job', epochs=7, warmup_epochs=2, batch_size=5, seed=3, workers=1,
                in_memory=True)
NPROC, PORT = 2, 29555


def load(name, path):
    """The file at `path` as the module `name` (loaded once)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def front_end(backbone):
    """A backbone's main.py, its folder on sys.path for its own imports."""
    folder = ROOT / BACKBONES[backbone].folder
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return load(f'{backbone}_main', folder / 'main.py')


def torchrun(words):
    """(processes, port, script, script arguments) as torchrun reads its command line."""
    args = torchrun_parser().parse_args(words)
    return int(args.nproc_per_node), args.master_port, args.training_script, args.training_script_args


def run_sh(words, tmp_path):
    """What CvT's run.sh hands to torchrun, with a stand-in $PYTHON that prints its arguments."""
    fake = tmp_path / 'python'
    fake.write_text('#!/bin/sh\nprintf "CALL\\0"; printf "%s\\0" "$@"\n')
    fake.chmod(0o755)
    out = subprocess.run(words, cwd=ROOT / BACKBONES['cvt'].folder, env={**trainer_env(), 'PYTHON': str(fake)},
                         capture_output=True, text=True, check=True).stdout
    called = out.split('CALL\0')[-1].split('\0')[:-1]
    assert called[:2] == ['-m', 'torch.distributed.run']
    return called[2:]


def pvt(script, argv):
    main = front_end('pvt')
    parser = main.get_args_parser()
    args = parser.parse_args(argv)
    main.apply_config(args, parser, argv)
    return dict(action='evaluate' if args.eval else 'rebuild_bank' if args.rebuild_bank else 'train',
                config=args.config, data=args.data_path, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                batch_size=args.batch_size, seed=args.seed, workers=args.num_workers, protocol=args.eval_protocol,
                checkpoint=args.resume or None, eval_align=args.eval_align,
                in_memory=args.data_in_memory)


def swin(script, argv):
    args, config = front_end('swin').parse_option(argv)
    return dict(action='evaluate' if config.EVAL_MODE else 'rebuild_bank' if args.rebuild_bank else 'train',
                config=args.cfg, data=config.DATA.DATA_PATH, epochs=config.TRAIN.EPOCHS,
                warmup_epochs=config.TRAIN.WARMUP_EPOCHS, batch_size=config.DATA.BATCH_SIZE, seed=config.SEED,
                workers=config.DATA.NUM_WORKERS, protocol=config.TEST.PROTOCOL,
                checkpoint=config.MODEL.RESUME or None, eval_align=config.MODEL.ISTA2.EVAL_ALIGN,
                in_memory=config.DATA.IN_MEMORY)


def cvt(script, argv, monkeypatch):
    runner = imported(BACKBONES['cvt'].folder, 'lib.runner')
    monkeypatch.setattr(sys, 'argv', [script, *argv])
    args = runner.parse_args('CvT')
    config = runner.update_config(runner.default_config.clone(), args)
    actions = {'tools/train.py': 'train', 'tools/test.py': 'evaluate', 'tools/rebuild_bank.py': 'rebuild_bank'}
    return dict(action=actions[script],
                config=args.cfg, data=config.DATASET.ROOT, epochs=config.TRAIN.END_EPOCH,
                warmup_epochs=config.TRAIN.LR_SCHEDULER.ARGS.warmup_epochs,
                batch_size=(config.TRAIN.BATCH_SIZE_PER_GPU, config.TEST.BATCH_SIZE_PER_GPU), seed=config.SEED,
                workers=config.WORKERS, protocol=config.TEST.PROTOCOL,
                checkpoint=config.TEST.MODEL_FILE or None, eval_align=config.MODEL.ISTA2.EVAL_ALIGN,
                in_memory=config.DATASET.IN_MEMORY)


def parsed(backbone, job, monkeypatch, tmp_path):
    """The job's command as the backbone's launcher and front end read it (in its folder)."""
    words = launch.command(backbone, job, NPROC, PORT)
    monkeypatch.chdir(ROOT / BACKBONES[backbone].folder)
    if backbone == 'cvt':
        assert words[:2] == ['bash', 'run.sh']
        nproc, port, script, argv = torchrun(run_sh(words, tmp_path))
        values = cvt(script, argv, monkeypatch)
    else:
        assert words[:3] == ['python', '-m', 'torch.distributed.run']
        nproc, port, script, argv = torchrun(words[3:])
        assert script == 'main.py'
        values = {'pvt': pvt, 'swin': swin}[backbone](script, argv)
    assert (nproc, port) == (NPROC, PORT)
    return values


@pytest.mark.parametrize('action', ['train', *PROTOCOLS, 'rebuild_bank'])
@pytest.mark.parametrize('backbone', BACKBONES)
def test_every_command_is_what_the_front_end_reads(backbone, action, monkeypatch, tmp_path):
    """A training job (validating under 'shuffled', with the bank), an evaluation under each protocol (aligning
    with the batch in place of the config's bank), or a bank rebuild."""
    config = next(iter(BACKBONES[backbone].cifar.values())).bank
    evaluate = action in PROTOCOLS
    job = launch.Job(config, evaluate=evaluate, rebuild_bank=action == 'rebuild_bank',
                     protocol=action if evaluate else 'shuffled', eval_align='batch' if evaluate else 'bank',
                     checkpoint=None if action == 'train' else '/runs/job/weights.pth', **SETTINGS)
    expected = dict(action='evaluate' if evaluate else action, config=config, data=job.data, epochs=job.epochs,
                    warmup_epochs=job.warmup_epochs, batch_size=job.batch_size, seed=job.seed, workers=job.workers,
                    protocol=job.protocol, checkpoint=job.checkpoint, eval_align=job.eval_align,
                    in_memory=True)
    if backbone == 'cvt':
        expected['batch_size'] = (job.batch_size, job.batch_size)
    assert parsed(backbone, job, monkeypatch, tmp_path) == expected


@pytest.mark.parametrize('backbone', BACKBONES)
def test_the_study_caps_the_warmup_its_configs_set(backbone, monkeypatch, tmp_path):
    study = load('cifar_study', ROOT / 'benchmarks' / 'cifar_study.py')
    for config in (c for configs in BACKBONES[backbone].cifar.values() for c in configs):
        job = launch.Job(config, **{**SETTINGS, 'warmup_epochs': None})
        assert parsed(backbone, job, monkeypatch, tmp_path)['warmup_epochs'] == study.CONFIG_WARMUP_EPOCHS


def test_a_checkpoint_is_for_evaluation_and_pvt_takes_no_config_keys():
    with pytest.raises(ValueError, match='weights to evaluate'):
        launch.command('pvt', launch.Job('c.py', 'd', 'o', checkpoint='w.pth'))
    with pytest.raises(ValueError, match='no config keys'):
        launch.command('pvt', launch.Job('c.py', 'd', 'o', extra={'TRAIN.EPOCHS': 1}))


def test_cvt_trains_and_evaluates_with_structured_results(tiny_data, tmp_path):
    job = launch.Job(BACKBONES['cvt'].cifar['CvT-13'].ista2, tiny_data, str(tmp_path / 'run'), epochs=1,
                     warmup_epochs=0, batch_size=8, seed=0, workers=0)
    trained = launch.run('cvt', job, log=tmp_path / 'train.log')
    assert set(trained) == {'epochs', 'best_acc1', 'test', 'train', 'n_parameters', 'weights', 'process_group'}
    assert trained['process_group'] is None  # one CPU process joins no group
    assert trained['epochs'] == 1 and trained['n_parameters'] > 0
    assert trained['test']['images'] == 40 and trained['test']['protocol'] == 'class-order'
    weights = trained['weights']
    assert weights == str(tmp_path / 'run' / 'imagenet' / 'cvt-13-ista2-32x32' / 'final_state.pth')
    assert os.path.isfile(weights)
    evaluation = launch.run('cvt', replace(job, evaluate=True, checkpoint=weights, protocol='batch-1',
                                           output=str(tmp_path / 'eval')), log=tmp_path / 'eval.log')
    assert set(evaluation) == {'checkpoint', 'acc1', 'acc5', 'loss', 'images', 'protocol', 'seconds',
                               'peak_memory_mib'}
    assert (evaluation['checkpoint'], evaluation['images'], evaluation['protocol']) == (weights, 40, 'batch-1')


@pytest.mark.parametrize('code, problem', [('print(*range(30), sep="\\n"); exit(3)', 'exited with status 3'),
                                           ('pass', 'exited without reporting a result')])
def test_a_failed_run_names_its_command_status_and_log(code, problem, monkeypatch, tmp_path):
    monkeypatch.setitem(BACKBONES, 'pvt', replace(BACKBONES['pvt'], commands={'train': ('{python}', '-c', code)}))
    log = tmp_path / 'run.log'
    with pytest.raises(launch.LaunchError) as failure:
        launch.run('pvt', launch.Job('c.py', 'd', 'o'), log=log)
    message = str(failure.value)
    assert code in message and problem in message and str(log) in message
    if 'range' in code:
        assert message.endswith('\n'.join(map(str, range(15, 30))))


def test_runs_launched_at_once_from_several_threads_get_distinct_ports():
    with ThreadPoolExecutor(8) as pool:
        ports = list(pool.map(lambda _: launch.free_port(), range(200)))
    assert len(set(ports)) == 200
