"""What tools/train.py and tools/test.py share: command line, config, output folder, logging, data."""
import argparse
import logging
import os
import sys
import time

import torch

from common import checkpoint, data
from common.runtime import init_runtime, seed_all

from lib.config import config as default_config
from lib.config import update_config

INTERPOLATIONS = {0: 'nearest', 2: 'bilinear', 3: 'bicubic'}


def parse_args(description):
    p = argparse.ArgumentParser(description)
    p.add_argument('--cfg', required=True, type=str, help='experiment config file')
    p.add_argument('--local-rank', '--local_rank', dest='local_rank', type=int, default=0, help='set by the launcher')
    p.add_argument('--port', type=int, default=9000, help='unused; the launcher sets the master port')
    p.add_argument('opts', nargs=argparse.REMAINDER, help='KEY VALUE config overrides')
    return p.parse_args()


def setup(args, phase):
    """Runtime, frozen config, output folder OUTPUT_DIR/<dataset>/<cfg name> and a logger."""
    runtime = init_runtime()
    config = update_config(default_config.clone(), args, runtime.world_size, runtime.rank)
    seed_all(config.SEED, runtime.rank)
    torch.backends.cudnn.benchmark = config.CUDNN.BENCHMARK
    torch.backends.cudnn.deterministic = config.CUDNN.DETERMINISTIC
    torch.backends.cudnn.enabled = config.CUDNN.ENABLED
    out = os.path.join(config.OUTPUT_DIR, config.DATASET.DATASET, config.NAME)
    checkpoint.prepare_output(out, 'output folder (OUTPUT_DIR/DATASET.DATASET/<cfg name>)')
    logger = logging.getLogger(f'cvt.{phase}')
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter(f'%(asctime)-15s:[P:%(process)d]:Rank[{runtime.rank}/{runtime.world_size}] %(message)s')
    stamp = time.strftime('%Y-%m-%d-%H-%M')
    handlers = [logging.FileHandler(os.path.join(out, f'{phase}_{stamp}_rank{runtime.rank}.txt'))]
    if runtime.is_main:
        handlers.append(logging.StreamHandler(sys.stdout))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.info(f'=> args: {vars(args)}')
    logger.info(f'=> config:\n{config.dump()}')
    return runtime, config, out, logger


def interpolation(value):
    if isinstance(value, str):
        return value
    if value not in INTERPOLATIONS:
        raise ValueError(f'interpolation {value!r}; valid: {INTERPOLATIONS} or a name')
    return INTERPOLATIONS[value]


def val_loader(config, runtime, dataset):
    dataset.transform = data.eval_transform(config.TEST.IMAGE_SIZE[0], crop_pct=0.875,
                                            interpolation=interpolation(config.TEST.INTERPOLATION),
                                            center_crop=config.TEST.CENTER_CROP, mean=config.INPUT.MEAN,
                                            std=config.INPUT.STD)
    sampler = data.eval_sampler(dataset, runtime, runtime.distributed, shuffle=config.TEST.SHUFFLE, seed=config.SEED)
    return data.loader(dataset, sampler, config.TEST.BATCH_SIZE_PER_GPU, config.WORKERS,
                       config.PIN_MEMORY and runtime.device.type == 'cuda', False)


def train_loader(config, runtime, dataset):
    timm_aug = config.AUG.TIMM_AUG
    if not (timm_aug.USE_LOADER or timm_aug.USE_TRANSFORM):
        raise ValueError('only timm augmentation is supported: set AUG.TIMM_AUG.USE_LOADER or USE_TRANSFORM true')
    dataset.transform = data.train_transform(
        config.TRAIN.IMAGE_SIZE[0], color_jitter=timm_aug.get('COLOR_JITTER', 0.4),
        auto_augment=timm_aug.get('AUTO_AUGMENT'), interpolation=timm_aug.get('INTERPOLATION', 'bilinear'),
        re_prob=timm_aug.get('RE_PROB', 0.), re_mode=timm_aug.get('RE_MODE', 'const'),
        re_count=timm_aug.get('RE_COUNT', 1), scale=tuple(config.AUG.SCALE), ratio=tuple(config.AUG.RATIO),
        hflip=timm_aug.get('HFLIP', 0.5), vflip=timm_aug.get('VFLIP', 0.), mean=config.INPUT.MEAN,
        std=config.INPUT.STD)
    kinds = {'default': 'distributed', 'repeated_aug': 'repeated'}
    if config.DATASET.SAMPLER not in kinds:
        raise ValueError(f'DATASET.SAMPLER {config.DATASET.SAMPLER!r}; valid: {", ".join(kinds)}')
    sampler = data.train_sampler(dataset, runtime, kinds[config.DATASET.SAMPLER], seed=config.SEED)
    loader = data.loader(dataset, sampler, config.TRAIN.BATCH_SIZE_PER_GPU, config.WORKERS,
                         config.PIN_MEMORY and runtime.device.type == 'cuda', True)
    return loader, sampler


def datasets(config):
    if 'imagenet' not in config.DATASET.DATASET:
        raise ValueError(f'DATASET.DATASET {config.DATASET.DATASET!r}: only image folders (imagenet) are supported')
    if config.TEST.REAL_LABELS or config.TEST.VALID_LABELS:
        raise ValueError('TEST.REAL_LABELS and TEST.VALID_LABELS are not supported')
    return data.image_folders(config.DATASET.ROOT, config.DATASET.TRAIN_SET, config.DATASET.TEST_SET)


def log_test(logger, stats):
    logger.info(f"=> TEST:\tLoss {stats['loss']:.4f}\tError@1 {100 - stats['acc1']:.3f}%\t"
                f"Error@5 {100 - stats['acc5']:.3f}%\tAccuracy@1 {stats['acc1']:.3f}%\t"
                f"Accuracy@5 {stats['acc5']:.3f}%\t")
