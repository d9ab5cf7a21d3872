"""Swin Transformer (+ ISTA2) ImageNet classification with the upstream Swin command line.

    torchrun --nproc_per_node N --master_port 12000 main.py \
        --cfg configs/swin_ista2/swin_tiny_ista2_patch4_window7_224.yaml \
        --data-path /path/to/imagenet [--output DIR --batch-size B]
    torchrun --nproc_per_node N main.py --eval --cfg CFG --resume CKPT --data-path DATA

Runs on GPUs (NCCL) or CPUs (gloo). Outputs go to OUTPUT/MODEL.NAME/TAG.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F

from common import checkpoint, data, trainer
from common.errors import ConfigError, require_config_file

from config import get_config
from models import build_model


def parse_option(argv=None):
    p = argparse.ArgumentParser('Swin Transformer + ISTA2 training and evaluation')
    p.add_argument('--cfg', required=True, metavar='FILE', help='path to a yaml config file')
    p.add_argument('--opts', nargs='+', default=None, help='KEY VALUE pairs that override the config')
    p.add_argument('--batch-size', type=int, help='per-process batch size')
    p.add_argument('--data-path', type=str, help='image folder with train/ and val/')
    p.add_argument('--zip', action='store_true', help='zipped ImageNet (not supported here)')
    p.add_argument('--cache-mode', type=str, default=None, choices=['no', 'full', 'part'],
                   help='zip-mode caching (not supported here, like --zip)')
    p.add_argument('--pretrained', help='initialise from this checkpoint (fine-tuning)')
    p.add_argument('--resume', help='resume from this checkpoint (default: the run folder\'s ckpt.pth)')
    p.add_argument('--accumulation-steps', type=int, help='gradient accumulation steps')
    p.add_argument('--use-checkpoint', action='store_true', help='gradient checkpointing to save memory')
    p.add_argument('--disable_amp', action='store_true', help='no mixed precision (CPU runs never use it)')
    p.add_argument('--amp-opt-level', type=str, choices=['O0', 'O1', 'O2'], help='deprecated; O0 disables AMP')
    p.add_argument('--output', default='output', type=str, metavar='PATH', help='root of the output folders')
    p.add_argument('--tag', help='run name inside OUTPUT/MODEL.NAME')
    p.add_argument('--eval', action='store_true', help='evaluate only')
    p.add_argument('--throughput', action='store_true', help='measure images/s only')
    p.add_argument('--rebuild-bank', action='store_true',
                   help='refill the ISTA2 banks of --resume (or the run folder\'s ckpt.pth) from training images and '
                        'write <name>_bank.pth (not upstream)')
    p.add_argument('--local_rank', '--local-rank', type=int, default=None, help='set by the launcher')
    p.add_argument('--fused_window_process', action='store_true', help='upstream CUDA kernel (not supported here)')
    p.add_argument('--fused_layernorm', action='store_true', help='apex fused LayerNorm (not supported here)')
    p.add_argument('--optim', type=str, help='adamw or sgd (overrides TRAIN.OPTIMIZER.NAME)')
    args = p.parse_args(argv)
    require_config_file(args.cfg, 'configs', '.yaml')
    if sum((args.eval, args.throughput, args.rebuild_bank)) > 1:
        p.error('--eval, --throughput and --rebuild-bank: give one of them')
    if args.cache_mode is not None:
        p.error(f'--cache-mode {args.cache_mode} caches zipped ImageNet (--zip), which is not supported here; '
                f'use an image folder and leave --cache-mode out (DATA.IN_MEMORY True '
                f'decodes a small one into memory)')
    return args, get_config(args)


def check_supported(config):
    unsupported = {  # what it is: (whether the config asks for it, what to do instead)
        'DATA.ZIP_MODE (--zip)': (config.DATA.ZIP_MODE, 'use an image folder'),
        f'DATA.DATASET {config.DATA.DATASET}': (config.DATA.DATASET != 'imagenet', 'use imagenet (any image folder)'),
        'FUSED_WINDOW_PROCESS': (config.FUSED_WINDOW_PROCESS, 'leave it off (plain PyTorch kernels)'),
        'FUSED_LAYERNORM': (config.FUSED_LAYERNORM, 'leave it off (plain PyTorch kernels)'),
        'TRAIN.LAYER_DECAY (SimMIM fine-tuning)': (config.TRAIN.LAYER_DECAY != 1.0, 'leave it at 1.0'),
        'ENABLE_AMP (SimMIM)': (config.ENABLE_AMP, 'use AMP_ENABLE'),
    }
    bad = [f'{name}: {advice}' for name, (asked, advice) in unsupported.items() if asked]
    if bad:
        raise ConfigError(f'not supported here: {"; ".join(bad)}')


def optimizer(config):
    """TRAIN.OPTIMIZER in timm's vocabulary: AdamW, or SGD with Nesterov momentum (timm's 'sgd')."""
    opt, train = config.TRAIN.OPTIMIZER, config.TRAIN
    if opt.NAME.lower() == 'adamw':
        return dict(opt='adamw', lr=train.BASE_LR, weight_decay=train.WEIGHT_DECAY, eps=opt.EPS, betas=tuple(opt.BETAS))
    if opt.NAME.lower() == 'sgd':
        return dict(opt='sgd', lr=train.BASE_LR, weight_decay=train.WEIGHT_DECAY, momentum=opt.MOMENTUM)
    raise ConfigError(f'TRAIN.OPTIMIZER.NAME {opt.NAME!r} is not supported; valid: adamw, sgd')


def no_decay(model):
    """Swin's rule: no weight decay on 1-D parameters, biases, and the model's named skips."""
    skip, keywords = model.no_weight_decay(), model.no_weight_decay_keywords()
    return lambda module, full_name, name, param: (param.ndim == 1 or name == 'bias' or full_name in skip
                                                   or any(k in full_name for k in keywords))


def scheduler(config):
    """TRAIN.LR_SCHEDULER in timm's vocabulary, stepped after every optimizer update; with
    WARMUP_PREFIX the cosine follows the warm-up instead of containing it."""
    s, train = config.TRAIN.LR_SCHEDULER, config.TRAIN
    common = dict(warmup_epochs=train.WARMUP_EPOCHS, warmup_lr=train.WARMUP_LR, min_lr=train.MIN_LR,
                  step_on_epochs=False)
    if s.NAME == 'cosine':
        epochs = max(train.EPOCHS - train.WARMUP_EPOCHS, 1) if s.WARMUP_PREFIX else train.EPOCHS
        return dict(sched='cosine', num_epochs=epochs, warmup_prefix=s.WARMUP_PREFIX, **common)
    if s.NAME == 'step':
        return dict(sched='step', decay_epochs=s.DECAY_EPOCHS, decay_rate=s.DECAY_RATE, **common)
    if s.NAME == 'multistep':
        return dict(sched='multistep', decay_milestones=list(s.MULTISTEPS), decay_rate=s.GAMMA, **common)
    raise ConfigError(f'TRAIN.LR_SCHEDULER.NAME {s.NAME!r} is not supported; valid: cosine, step, multistep')


# the names of the trainer settings in this config tree, for messages
NAMES = {'epochs': 'TRAIN.EPOCHS', 'warmup_epochs': 'TRAIN.WARMUP_EPOCHS',
         'batch_size': 'DATA.BATCH_SIZE (--batch-size)', 'eval_batch_size': 'DATA.BATCH_SIZE (--batch-size)',
         'workers': 'DATA.NUM_WORKERS',
         'accumulation_steps': 'TRAIN.ACCUMULATION_STEPS (--accumulation-steps)', 'start_epoch': 'TRAIN.START_EPOCH',
         'lr': 'TRAIN.BASE_LR', 'weight_decay': 'TRAIN.WEIGHT_DECAY', 'clip_grad': 'TRAIN.CLIP_GRAD',
         'smoothing': 'MODEL.LABEL_SMOOTHING', 'resume': '--resume', 'evaluate': '--eval', 'folder': 'a run folder',
         'protocol': 'TEST.PROTOCOL', 'print_freq': 'PRINT_FREQ', 'eval_align': 'MODEL.ISTA2.EVAL_ALIGN',
         'rebuild_bank': '--rebuild-bank', 'in_memory': 'DATA.IN_MEMORY'}


def load_pretrained(config, model, log):
    """Fine-tuning start: relative-position tables and absolute position embeddings resized to the
    model, a head of another class count replaced; reports the keys the model has that were new."""
    state = dict(checkpoint.model_state(checkpoint.load(config.MODEL.PRETRAINED), keys=('model',)))
    own = model.state_dict()
    for key in [k for k in state if k.endswith(('relative_position_index', 'relative_coords_table', 'attn_mask'))]:
        del state[key]
    for key, value in list(state.items()):
        if key not in own or own[key].shape == value.shape:
            continue
        if key.endswith('relative_position_bias_table'):  # (L, heads): resize the (2w-1)^2 grid
            side, new_side = int(value.shape[0] ** 0.5), int(own[key].shape[0] ** 0.5)
            grid = value.T.reshape(1, -1, side, side)
            state[key] = F.interpolate(grid, size=(new_side, new_side), mode='bicubic').reshape(-1, new_side ** 2).T
        elif key.endswith('absolute_pos_embed'):  # (1, L, C)
            side, new_side = int(value.shape[1] ** 0.5), int(own[key].shape[1] ** 0.5)
            grid = value.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            state[key] = F.interpolate(grid, size=(new_side, new_side), mode='bicubic').flatten(2).transpose(1, 2)
        elif key.startswith('head.'):
            log(f'{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}: set to zero')
            state[key] = torch.zeros_like(own[key])
    missing = checkpoint.load_weights(model, state, strict=False, source=config.MODEL.PRETRAINED)
    missing = [k for k in missing if not k.endswith(('relative_position_index', 'attn_mask'))]
    log(f'=> loaded {config.MODEL.PRETRAINED}; keys new to this model (left initialised): {missing}')


def main(config, rebuild_bank=False):
    """Train, evaluate (--eval), time (--throughput) or rebuild the ISTA2 banks (--rebuild-bank); returns the
    run's result (see common.trainer)."""
    session = trainer.setup(config.SEED, output=config.OUTPUT,
                            output_option='output folder (--output/MODEL.NAME/--tag)', log_file='log_rank{rank}.txt',
                            logger_name=config.MODEL.NAME,
                            log_format='[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s')
    log = session.log
    train_set, val_set = data.image_folders(config.DATA.DATA_PATH)
    config.defrost()
    config.MODEL.NUM_CLASSES = len(train_set.classes)
    world_batch = config.DATA.BATCH_SIZE * session.runtime.world_size * config.TRAIN.ACCUMULATION_STEPS / 512.0
    for key in ('BASE_LR', 'WARMUP_LR', 'MIN_LR'):
        setattr(config.TRAIN, key, getattr(config.TRAIN, key) * world_batch)
    config.freeze()
    if session.runtime.is_main:
        with open(os.path.join(config.OUTPUT, 'config.json'), 'w') as f:  # JSON, which YAML readers also read
            json.dump(config, f, indent=2)
    log(config.dump())

    aug = config.AUG
    train_set.transform = data.train_transform(
        config.DATA.IMG_SIZE, aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
        aug.AUTO_AUGMENT if aug.AUTO_AUGMENT != 'none' else None, config.DATA.INTERPOLATION, aug.REPROB,
        aug.REMODE, aug.RECOUNT)
    val_set.transform = data.eval_transform(config.DATA.IMG_SIZE, interpolation=config.DATA.INTERPOLATION,
                                            center_crop=config.TEST.CROP)
    log(f'Creating model:{config.MODEL.TYPE}/{config.MODEL.NAME}')
    model = build_model(config)
    log(str(model))
    log(f'number of GFLOPs: {model.flops() / 1e9}')
    if config.MODEL.PRETRAINED:
        load_pretrained(config, model, log)
    mixup = None
    if aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None:
        mixup = dict(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
                     prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE)
    recipe = trainer.Recipe(
        train_set, val_set, names=NAMES, seed=config.SEED, batch_size=config.DATA.BATCH_SIZE,
        eval_batch_size=config.DATA.BATCH_SIZE, workers=config.DATA.NUM_WORKERS, pin_memory=config.DATA.PIN_MEMORY,
        in_memory=config.DATA.IN_MEMORY,
        eval_sharded=not config.TEST.SEQUENTIAL,
        protocol=trainer.resolve_protocol(config.TEST.PROTOCOL, 'TEST.PROTOCOL', config.TEST.SHUFFLE, 'TEST.SHUFFLE'),
        epochs=config.TRAIN.EPOCHS, start_epoch=config.TRAIN.START_EPOCH,
        optimizer=optimizer(config), param_groups=lambda m: trainer.decay_groups(m, no_decay(m)),
        scheduler=scheduler(config), mixup=mixup, smoothing=config.MODEL.LABEL_SMOOTHING,
        clip_grad=config.TRAIN.CLIP_GRAD or None, accumulation_steps=config.TRAIN.ACCUMULATION_STEPS,
        amp=config.AMP_ENABLE, eval_amp=config.AMP_ENABLE, validate_after_resume=True,
        ddp=dict(broadcast_buffers=False), print_freq=config.PRINT_FREQ,
        checkpoints=trainer.Checkpoints(config.OUTPUT, latest='ckpt.pth', save_every=config.SAVE_FREQ,
                                        extra={'config': json.loads(json.dumps(config))}, resume=config.MODEL.RESUME,
                                        auto_resume=config.TRAIN.AUTO_RESUME, eval_file='ckpt.pth'))
    if config.EVAL_MODE:
        return trainer.evaluate(session, model, recipe)
    if config.THROUGHPUT_MODE:
        return trainer.throughput(session, model, recipe)
    if rebuild_bank:
        return trainer.rebuild_bank(session, model, recipe)
    return trainer.train(session, model, recipe)


def cli(argv=None):
    """The command line: parse, build the config, run; returns the run's result."""
    args, config = parse_option(argv)
    check_supported(config)
    return main(config, args.rebuild_bank)


if __name__ == '__main__':
    trainer.run_cli(cli)
