"""The registry of the three backbones: where each lives, its config pairs, how a generic job
(common.launch.Job) becomes its own command line, and how its config files build models through its
own config system.

Command words may hold {python}, {nproc} and {port}. Each generic setting maps to the backbone's
names for it: a flag ('--epochs') or a config key ('TRAIN.EPOCHS'), which goes after `keys_after`.
"""
import importlib
import os
import sys
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = ('{python}', '-m', 'torch.distributed.run', '--nproc_per_node', '{nproc}', '--master_port', '{port}',
            'main.py')


def run_sh(job_type):
    """CvT's launcher for tools/<job_type>.py."""
    return 'bash', 'run.sh', '-g', '{nproc}', '-t', job_type, '-p', '{port}'


class CifarConfigs(NamedTuple):
    """A row of the CIFAR-10 study: the baseline, ISTA2, and ISTA2 with eval_align='bank' (its training is ISTA2's)."""
    baseline: str
    ista2: str
    bank: str


@dataclass(frozen=True)
class Backbone:
    title: str
    folder: str  # relative to the repository root; commands run there, config paths are relative to it
    paper: dict  # the paper's table: row title -> (baseline config, ISTA2 config)
    cifar: dict  # the CIFAR-10 study's rows, the paper's row titles: row title -> CifarConfigs
    commands: dict  # 'train' / 'evaluate' / 'rebuild_bank' -> the launcher's words, before the settings
    names: dict  # generic setting -> the backbone's flag or config key (or a tuple of them)
    keys_after: tuple | None  # words before the KEY VALUE pairs; None: the command line takes no config keys
    load: Callable  # config file -> the backbone's config object
    model: Callable  # (config object, number of classes) -> the model its trainer builds

    def path(self, config):
        """A config file's path (relative ones are relative to the backbone's folder)."""
        return os.path.join(ROOT, self.folder, config)

    def build(self, config, num_classes=1000):
        """The model a config file describes, as the backbone's trainer builds it."""
        return self.model(self.load(self.path(config)), num_classes)


def imported(folder, module):
    """`module` of a backbone's folder, imported as its own scripts import it."""
    path = os.path.join(ROOT, folder)
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(module)


def pvt_config(path):
    from mmengine.config import Config
    return Config.fromfile(path).to_dict()['cfg']


def pvt_model(cfg, num_classes):
    create_model = imported('PVT/classification', 'pvt_v2').create_model
    return create_model(cfg['model'], num_classes=num_classes, drop_path_rate=cfg['drop_path'],
                        ista2_args=cfg['ista2_args'])


def swin_config(path):
    return imported('SWIN/classification', 'config').load_config(path)


def swin_model(config, num_classes):
    config.defrost()
    config.MODEL.NUM_CLASSES = num_classes
    return imported('SWIN/classification', 'models').build_model(config)


def cvt_config(path):
    lib_config = imported('CVT/classification', 'lib.config')
    return lib_config.update_config(lib_config.config.clone(), Namespace(cfg=path, opts=[]))


def cvt_model(config, num_classes):
    config.defrost()
    config.MODEL.NUM_CLASSES = num_classes
    config.freeze()
    return imported('CVT/classification', 'lib.models').build_model(config)


BACKBONES = {
    'pvt': Backbone(
        title='PVTv2', folder='PVT/classification',
        paper={'PVTv2-B0': ('configs/pvt_v2_ista2/pvt_v2_b0.py', 'configs/pvt_v2_ista2/pvt_v2_b0_ista2.py'),
               'PVTv2-B2': ('configs/pvt_v2_ista2/pvt_v2_b2.py', 'configs/pvt_v2_ista2/pvt_v2_b2_ista2.py')},
        cifar={'PVTv2-B0': CifarConfigs('configs/cifar10/pvt_v2_b0.py', 'configs/cifar10/pvt_v2_b0_ista2.py',
                                        'configs/cifar10/pvt_v2_b0_ista2_bank.py'),
               'PVTv2-B2': CifarConfigs('configs/cifar10/pvt_v2_b2.py', 'configs/cifar10/pvt_v2_b2_ista2.py',
                                        'configs/cifar10/pvt_v2_b2_ista2_bank.py')},
        commands={'train': TORCHRUN, 'evaluate': (*TORCHRUN, '--eval'), 'rebuild_bank': (*TORCHRUN, '--rebuild-bank')},
        names={'config': '--config', 'data': '--data-path', 'output': '--output_dir', 'epochs': '--epochs',
               'warmup_epochs': '--warmup-epochs', 'batch_size': '--batch-size', 'seed': '--seed',
               'workers': '--num_workers', 'protocol': '--eval-protocol', 'checkpoint': '--resume',
               'eval_align': '--eval-align', 'in_memory': '--data-in-memory'},
        keys_after=None, load=pvt_config, model=pvt_model),
    'swin': Backbone(
        title='Swin Transformer', folder='SWIN/classification',
        paper={'Swin-T': ('configs/swin_ista2/swin_tiny_patch4_window7_224.yaml',
                          'configs/swin_ista2/swin_tiny_ista2_patch4_window7_224.yaml')},
        cifar={'Swin-T': CifarConfigs('configs/cifar10/swin_tiny_patch2_window4_32.yaml',
                                      'configs/cifar10/swin_tiny_ista2_patch2_window4_32.yaml',
                                      'configs/cifar10/swin_tiny_ista2_bank_patch2_window4_32.yaml')},
        commands={'train': TORCHRUN, 'evaluate': (*TORCHRUN, '--eval'), 'rebuild_bank': (*TORCHRUN, '--rebuild-bank')},
        names={'config': '--cfg', 'data': '--data-path', 'output': '--output', 'epochs': 'TRAIN.EPOCHS',
               'warmup_epochs': 'TRAIN.WARMUP_EPOCHS', 'batch_size': '--batch-size', 'seed': 'SEED',
               'workers': 'DATA.NUM_WORKERS', 'protocol': 'TEST.PROTOCOL', 'checkpoint': '--resume',
               'eval_align': 'MODEL.ISTA2.EVAL_ALIGN', 'in_memory': 'DATA.IN_MEMORY'},
        keys_after=('--opts',), load=swin_config, model=swin_model),
    'cvt': Backbone(
        title='CvT', folder='CVT/classification',
        paper={'CvT-13': ('experiments/imagenet/cvt_ista2/cvt-13-224x224.yaml',
                          'experiments/imagenet/cvt_ista2/cvt-13-ista2-224x224.yaml')},
        cifar={'CvT-13': CifarConfigs('experiments/cifar10/cvt-13-32x32.yaml',
                                      'experiments/cifar10/cvt-13-ista2-32x32.yaml',
                                      'experiments/cifar10/cvt-13-ista2-bank-32x32.yaml')},
        commands={'train': run_sh('train'), 'evaluate': run_sh('test'), 'rebuild_bank': run_sh('rebuild_bank')},
        names={'config': '--cfg', 'data': 'DATASET.ROOT', 'output': 'OUTPUT_DIR', 'epochs': 'TRAIN.END_EPOCH',
               'warmup_epochs': 'TRAIN.LR_SCHEDULER.ARGS.warmup_epochs',
               'batch_size': ('TRAIN.BATCH_SIZE_PER_GPU', 'TEST.BATCH_SIZE_PER_GPU'), 'seed': 'SEED',
               'workers': 'WORKERS', 'protocol': 'TEST.PROTOCOL', 'checkpoint': 'TEST.MODEL_FILE',
               'eval_align': 'MODEL.ISTA2.EVAL_ALIGN', 'in_memory': 'DATASET.IN_MEMORY'},
        keys_after=(), load=cvt_config, model=cvt_model),
}


def config_name(path):
    """A config file's name without folder and suffix (what the tables print)."""
    return os.path.splitext(os.path.basename(path))[0]
