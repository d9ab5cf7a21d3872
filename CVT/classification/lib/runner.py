"""What tools/train.py and tools/test.py share: command line, config, session, data and the recipe."""
import argparse
import os
import time
from argparse import Namespace

import torch
from timm.scheduler.scheduler_factory import scheduler_kwargs

from common import data, trainer
from common.errors import ConfigError, require_config_file

from lib.config import config as default_config
from lib.config import update_config
from lib.models import build_model

INTERPOLATIONS = {0: 'nearest', 2: 'bilinear', 3: 'bicubic'}
NORMS = {'bn': (torch.nn.BatchNorm2d,), 'gn': (torch.nn.GroupNorm,), 'ln': (torch.nn.LayerNorm,)}
SAMPLERS = {'default': 'distributed', 'repeated_aug': 'repeated'}


def parse_args(description):
    p = argparse.ArgumentParser(description)
    p.add_argument('--cfg', required=True, type=str, help='experiment config file')
    p.add_argument('--local-rank', '--local_rank', dest='local_rank', type=int, default=0, help='set by the launcher')
    p.add_argument('--port', type=int, default=9000, help='unused; the launcher sets the master port')
    p.add_argument('opts', nargs=argparse.REMAINDER, help='KEY VALUE config overrides')
    args = p.parse_args()
    require_config_file(args.cfg, 'experiments', '.yaml')
    return args


def setup(args, phase):
    """The frozen config and the session: runtime, seeds, output folder OUTPUT_DIR/<dataset>/<cfg name>,
    per-rank log files <phase>_<time>_rank<r>.txt."""
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    config = update_config(default_config.clone(), args, world, rank)
    out = os.path.join(config.OUTPUT_DIR, config.DATASET.DATASET, config.NAME)
    session = trainer.setup(
        config.SEED, output=out, output_option='output folder (OUTPUT_DIR/DATASET.DATASET/<cfg name>)',
        log_file=f'{phase}_{time.strftime("%Y-%m-%d-%H-%M")}_rank{{rank}}.txt', logger_name=f'cvt.{phase}',
        log_format=f'%(asctime)-15s:[P:%(process)d]:Rank[{rank}/{world}] %(message)s',
        cudnn=dict(benchmark=config.CUDNN.BENCHMARK, deterministic=config.CUDNN.DETERMINISTIC,
                   enabled=config.CUDNN.ENABLED))
    session.log(f'=> args: {vars(args)}')
    session.log(f'=> config:\n{config.dump()}')
    return config, session


def interpolation(value):
    if isinstance(value, str):
        return value
    if value not in INTERPOLATIONS:
        raise ConfigError(f'interpolation {value!r}; valid: {INTERPOLATIONS} or a name')
    return INTERPOLATIONS[value]


def datasets(config):
    """The train and val image folders with upstream's timm transforms; the config's class count set."""
    if 'imagenet' not in config.DATASET.DATASET:
        raise ConfigError(f'DATASET.DATASET {config.DATASET.DATASET!r}: only image folders (imagenet) are supported')
    if config.TEST.REAL_LABELS or config.TEST.VALID_LABELS:
        raise ConfigError('TEST.REAL_LABELS and TEST.VALID_LABELS are not supported')
    timm_aug = config.AUG.TIMM_AUG
    if not (timm_aug.USE_LOADER or timm_aug.USE_TRANSFORM):
        raise ConfigError('only timm augmentation is supported: set AUG.TIMM_AUG.USE_LOADER or USE_TRANSFORM true')
    train_set, val_set = data.image_folders(config.DATASET.ROOT, config.DATASET.TRAIN_SET, config.DATASET.TEST_SET)
    train_set.transform = data.train_transform(
        config.TRAIN.IMAGE_SIZE[0], color_jitter=timm_aug.get('COLOR_JITTER', 0.4),
        auto_augment=timm_aug.get('AUTO_AUGMENT'), interpolation=timm_aug.get('INTERPOLATION', 'bilinear'),
        re_prob=timm_aug.get('RE_PROB', 0.), re_mode=timm_aug.get('RE_MODE', 'const'),
        re_count=timm_aug.get('RE_COUNT', 1), scale=tuple(config.AUG.SCALE), ratio=tuple(config.AUG.RATIO),
        hflip=timm_aug.get('HFLIP', 0.5), vflip=timm_aug.get('VFLIP', 0.), mean=config.INPUT.MEAN,
        std=config.INPUT.STD)
    val_set.transform = data.eval_transform(config.TEST.IMAGE_SIZE[0], crop_pct=0.875,
                                            interpolation=interpolation(config.TEST.INTERPOLATION),
                                            center_crop=config.TEST.CENTER_CROP, mean=config.INPUT.MEAN,
                                            std=config.INPUT.STD)
    config.defrost()
    config.MODEL.NUM_CLASSES = len(train_set.classes)
    config.freeze()
    return train_set, val_set


def optimizer(config):
    """TRAIN.OPTIMIZER in timm's vocabulary, and the parameter groups: upstream's WITHOUT_WD_LIST split,
    or timm's own for 'timm'."""
    name, lr, wd = config.TRAIN.OPTIMIZER, config.TRAIN.LR, config.TRAIN.WD
    if name == 'timm':
        return {k.lower(): v for k, v in config.TRAIN.OPTIMIZER_ARGS.items()}, lambda model: model
    kinds = {'adamW': dict(opt='adamw'), 'adam': dict(opt='adam'),
             'sgd': dict(opt='sgd' if config.TRAIN.NESTEROV else 'momentum', momentum=config.TRAIN.MOMENTUM)}
    if name not in kinds:
        raise ConfigError(f'TRAIN.OPTIMIZER {name!r} is not supported; valid: adamW, adam, sgd, timm')
    skip_words = set(config.TRAIN.WITHOUT_WD_LIST)

    def groups(model):
        skip_names = model.no_weight_decay()

        def exempt(module, full_name, name, param):
            """WITHOUT_WD_LIST names 'bn', 'gn', 'ln' (those norms' parameters), 'bias' and 'dw' (depth-wise
            conv weights); no_weight_decay() names match as substrings. ISTA2's RMSNorm weights are decayed,
            as in the reference."""
            return (any(isinstance(module, NORMS[w]) for w in skip_words & NORMS.keys())
                    or ('bias' in skip_words and name == 'bias')
                    or ('dw' in skip_words and isinstance(module, torch.nn.Conv2d) and module.groups > 1)
                    or any(s in full_name for s in skip_names))
        return trainer.decay_groups(model, exempt)
    return dict(kinds[name], lr=lr, weight_decay=wd), groups


def log_test(stats):
    return [f"=> TEST:\tLoss {stats['loss']:.4f}\tError@1 {100 - stats['acc1']:.3f}%\tError@5 "
            f"{100 - stats['acc5']:.3f}%\tAccuracy@1 {stats['acc1']:.3f}%\tAccuracy@5 {stats['acc5']:.3f}%\t",
            f"=> evaluated {stats['images']} images"]


def recipe(config, session, train_set, val_set, phase):
    """The run the config describes, for trainer.train (phase 'train') or trainer.evaluate ('test')."""
    if config.DATASET.SAMPLER not in SAMPLERS:
        raise ConfigError(f'DATASET.SAMPLER {config.DATASET.SAMPLER!r}; valid: {", ".join(SAMPLERS)}')
    method = config.TRAIN.LR_SCHEDULER.get('METHOD')
    if phase == 'train' and method != 'timm':
        raise ConfigError(f'TRAIN.LR_SCHEDULER.METHOD {method!r} is not supported; valid: timm')
    aug, out = config.AUG, session.output
    opt, groups = optimizer(config)
    mixup = None
    if aug.MIXUP_PROB > 0:
        mixup = dict(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.MIXCUT, cutmix_minmax=aug.MIXCUT_MINMAX or None,
                     prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE)
    resume = config.TRAIN.CHECKPOINT if phase == 'train' else config.TEST.MODEL_FILE
    tensorboard = {'train_loss': ('train', 'loss'), 'valid_loss': ('test', 'loss'), 'valid_top1': ('test', 'acc1')}
    return trainer.Recipe(
        train_set, val_set, seed=config.SEED, batch_size=config.TRAIN.BATCH_SIZE_PER_GPU,
        eval_batch_size=config.TEST.BATCH_SIZE_PER_GPU, workers=config.WORKERS, pin_memory=config.PIN_MEMORY,
        in_memory=config.DATASET.IN_MEMORY,
        train_sampler=SAMPLERS[config.DATASET.SAMPLER],
        protocol=trainer.resolve_protocol(config.TEST.PROTOCOL, 'TEST.PROTOCOL', config.TEST.SHUFFLE, 'TEST.SHUFFLE'),
        epochs=config.TRAIN.END_EPOCH, start_epoch=config.TRAIN.BEGIN_EPOCH, optimizer=opt, param_groups=groups,
        scheduler=scheduler_kwargs(Namespace(**config.TRAIN.LR_SCHEDULER.ARGS)) if method == 'timm' else {},
        mixup=mixup, smoothing=config.LOSS.LABEL_SMOOTHING, clip_grad=config.TRAIN.CLIP_GRAD_NORM or None,
        amp=config.AMP.ENABLED, eval_amp=False, eval_from_epoch=config.TRAIN.EVAL_BEGIN_EPOCH,
        detect_anomaly=config.TRAIN.DETECT_ANOMALY, ddp=dict(find_unused_parameters=True),
        print_freq=config.PRINT_FREQ, summary=log_test,
        checkpoints=trainer.Checkpoints(
            out, model_key='state_dict', best_key='perf', stores_next_epoch=True, best_bare=True,
            each_epoch=config.TRAIN.SAVE_ALL_MODELS, final_state=True, extra={'model': config.MODEL.NAME},
            resume=resume, auto_resume=config.TRAIN.AUTO_RESUME, eval_file='model_best.pth',
            tolerated_missing=('bg_token',)),
        epoch_logs=[trainer.TensorBoard(out, tensorboard)] if phase == 'train' and session.runtime.is_main else [],
        names={'epochs': 'TRAIN.END_EPOCH', 'warmup_epochs': 'TRAIN.LR_SCHEDULER.ARGS.warmup_epochs',
               'batch_size': 'TRAIN.BATCH_SIZE_PER_GPU', 'eval_batch_size': 'TEST.BATCH_SIZE_PER_GPU',
               'workers': 'WORKERS', 'start_epoch': 'TRAIN.BEGIN_EPOCH', 'eval_from_epoch': 'TRAIN.EVAL_BEGIN_EPOCH',
               'lr': 'TRAIN.LR', 'weight_decay': 'TRAIN.WD', 'clip_grad': 'TRAIN.CLIP_GRAD_NORM',
               'smoothing': 'LOSS.LABEL_SMOOTHING', 'resume': 'TRAIN.CHECKPOINT' if phase == 'train' else
               'TEST.MODEL_FILE', 'evaluate': 'tools/test.py', 'folder': 'a run folder', 'protocol': 'TEST.PROTOCOL',
               'print_freq': 'PRINT_FREQ', 'eval_align': 'MODEL.ISTA2.EVAL_ALIGN',
               'rebuild_bank': 'bash run.sh -t rebuild_bank', 'in_memory': 'DATASET.IN_MEMORY'})


def on_model_file(action, phase, description):
    """tools/test.py and tools/rebuild_bank.py: action(session, model, recipe) on TEST.MODEL_FILE (default: the run
    folder's model_best.pth), e.g. trainer.evaluate or trainer.rebuild_bank; `phase` names the log files."""
    config, session = setup(parse_args(description), phase)
    if config.TEST.MODEL_FILE and not config.TEST.MODEL_FILE.endswith('.pth'):
        raise ConfigError(f'TEST.MODEL_FILE {config.TEST.MODEL_FILE!r} must be a .pth file')
    train_set, val_set = datasets(config)
    return action(session, build_model(config), recipe(config, session, train_set, val_set, 'test'))
