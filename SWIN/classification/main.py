"""Swin Transformer (+ ISTA2) ImageNet classification with the upstream Swin command line.

    torchrun --nproc_per_node N --master_port 12000 main.py \
        --cfg configs/swin_ista2/swin_tiny_ista2_patch4_window7_224.yaml \
        --data-path /path/to/imagenet [--output DIR --batch-size B]
    torchrun --nproc_per_node N main.py --eval --cfg CFG --resume CKPT --data-path DATA

Runs on GPUs (NCCL) or CPUs (gloo). Outputs go to OUTPUT/MODEL.NAME/TAG.
"""
import argparse
import datetime
import json
import logging
import os
import sys
import time

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, StepLRScheduler
from torch.nn.parallel import DistributedDataParallel

from common import checkpoint, data, engine
from common.runtime import init_runtime, seed_all, shutdown

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
    p.add_argument('--local_rank', '--local-rank', type=int, default=None, help='set by the launcher')
    p.add_argument('--fused_window_process', action='store_true', help='upstream CUDA kernel (not supported here)')
    p.add_argument('--fused_layernorm', action='store_true', help='apex fused LayerNorm (not supported here)')
    p.add_argument('--optim', type=str, help='adamw or sgd (overrides TRAIN.OPTIMIZER.NAME)')
    args = p.parse_args(argv)
    if args.cache_mode is not None:
        p.error(f'--cache-mode {args.cache_mode} caches zipped ImageNet (--zip), which is not supported here; '
                f'use an image folder and leave --cache-mode out')
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
        raise ValueError(f'not supported here: {"; ".join(bad)}')
    if config.EVAL_MODE and not config.MODEL.RESUME and not os.path.isfile(os.path.join(config.OUTPUT, 'ckpt.pth')):
        raise ValueError('--eval needs a checkpoint: --resume PATH, or a run folder holding ckpt.pth')


def create_logger(output_dir, rank, name):
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter('[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s')
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        logger.addHandler(console)
    file = logging.FileHandler(os.path.join(output_dir, f'log_rank{rank}.txt'), mode='a')
    file.setFormatter(fmt)
    logger.addHandler(file)
    return logger


def build_optimizer(config, model):
    """AdamW (or SGD with Nesterov) with no weight decay on 1-D parameters, biases and the named skips."""
    skip, keywords = model.no_weight_decay(), model.no_weight_decay_keywords()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name.endswith('.bias') or name in skip or any(k in name for k in keywords):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{'params': decay}, {'params': no_decay, 'weight_decay': 0.}]
    opt = config.TRAIN.OPTIMIZER
    if opt.NAME.lower() == 'adamw':
        return torch.optim.AdamW(groups, lr=config.TRAIN.BASE_LR, eps=opt.EPS, betas=tuple(opt.BETAS),
                                 weight_decay=config.TRAIN.WEIGHT_DECAY)
    if opt.NAME.lower() == 'sgd':
        return torch.optim.SGD(groups, lr=config.TRAIN.BASE_LR, momentum=opt.MOMENTUM, nesterov=True,
                               weight_decay=config.TRAIN.WEIGHT_DECAY)
    raise ValueError(f'TRAIN.OPTIMIZER.NAME {opt.NAME!r} is not supported; valid: adamw, sgd')


def build_scheduler(config, optimizer, steps_per_epoch):
    """A timm scheduler stepped once per optimizer step (step_update)."""
    s, train = config.TRAIN.LR_SCHEDULER, config.TRAIN
    total, warmup = train.EPOCHS * steps_per_epoch, train.WARMUP_EPOCHS * steps_per_epoch
    if s.NAME == 'cosine' and s.WARMUP_PREFIX and train.EPOCHS <= train.WARMUP_EPOCHS:
        raise ValueError(f'TRAIN.EPOCHS {train.EPOCHS} must exceed TRAIN.WARMUP_EPOCHS {train.WARMUP_EPOCHS} '
                         f'(the cosine schedule follows the warm-up)')
    common = dict(warmup_lr_init=train.WARMUP_LR, warmup_t=warmup, t_in_epochs=False)
    if s.NAME == 'cosine':
        return CosineLRScheduler(optimizer, t_initial=total - warmup if s.WARMUP_PREFIX else total,
                                 lr_min=train.MIN_LR, cycle_limit=1, warmup_prefix=s.WARMUP_PREFIX, **common)
    if s.NAME == 'step':
        return StepLRScheduler(optimizer, decay_t=s.DECAY_EPOCHS * steps_per_epoch, decay_rate=s.DECAY_RATE, **common)
    if s.NAME == 'multistep':
        return MultiStepLRScheduler(optimizer, decay_t=[m * steps_per_epoch for m in s.MULTISTEPS],
                                    decay_rate=s.GAMMA, **common)
    raise ValueError(f'TRAIN.LR_SCHEDULER.NAME {s.NAME!r} is not supported; valid: cosine, step, multistep')


def load_pretrained(config, model, logger):
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
            logger.info(f'{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}: set to zero')
            state[key] = torch.zeros_like(own[key])
    missing = checkpoint.load_weights(model, state, strict=False, source=config.MODEL.PRETRAINED)
    missing = [k for k in missing if not k.endswith(('relative_position_index', 'attn_mask'))]
    logger.info(f'=> loaded {config.MODEL.PRETRAINED}; keys new to this model (left initialised): {missing}')


@torch.no_grad()
def throughput(loader, model, logger):
    """Images per second of the model's forward pass, as upstream measures it."""
    model.eval()
    images = next(iter(loader))[0].to(next(model.parameters()).device)
    for _ in range(50):
        model(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.time()
    for _ in range(30):
        model(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    logger.info(f'batch_size {len(images)} throughput {30 * len(images) / (time.time() - start)}')


def main(config):
    runtime = init_runtime()
    device = runtime.device
    seed_all(config.SEED, runtime.rank)
    torch.backends.cudnn.benchmark = True

    train_set, val_set = data.image_folders(config.DATA.DATA_PATH)
    world_batch = config.DATA.BATCH_SIZE * runtime.world_size * config.TRAIN.ACCUMULATION_STEPS / 512.0
    config.defrost()
    config.MODEL.NUM_CLASSES = len(train_set.classes)
    for key in ('BASE_LR', 'WARMUP_LR', 'MIN_LR'):
        setattr(config.TRAIN, key, getattr(config.TRAIN, key) * world_batch)
    config.freeze()

    checkpoint.prepare_output(config.OUTPUT, 'output folder (--output/MODEL.NAME/--tag)')
    logger = create_logger(config.OUTPUT, runtime.rank, config.MODEL.NAME)
    if runtime.is_main:
        with open(os.path.join(config.OUTPUT, 'config.json'), 'w') as f:  # JSON, which YAML readers also read
            json.dump(config, f, indent=2)
    logger.info(config.dump())

    aug = config.AUG
    train_set.transform = data.train_transform(
        config.DATA.IMG_SIZE, aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
        aug.AUTO_AUGMENT if aug.AUTO_AUGMENT != 'none' else None, config.DATA.INTERPOLATION, aug.REPROB,
        aug.REMODE, aug.RECOUNT)
    val_set.transform = data.eval_transform(config.DATA.IMG_SIZE, interpolation=config.DATA.INTERPOLATION,
                                            center_crop=config.TEST.CROP)
    pin = config.DATA.PIN_MEMORY and device.type == 'cuda'
    train_sampler = data.train_sampler(train_set, runtime, 'distributed', seed=config.SEED)
    train_loader = data.loader(train_set, train_sampler, config.DATA.BATCH_SIZE, config.DATA.NUM_WORKERS, pin, True)
    sharded = runtime.distributed and not config.TEST.SEQUENTIAL
    val_sampler = data.eval_sampler(val_set, runtime, sharded, shuffle=config.TEST.SHUFFLE, seed=config.SEED)
    val_loader = data.loader(val_set, val_sampler, config.DATA.BATCH_SIZE, config.DATA.NUM_WORKERS, pin, False)
    mixup_fn = None
    if aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None:
        mixup_fn = Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
                         prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                         label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)

    logger.info(f'Creating model:{config.MODEL.TYPE}/{config.MODEL.NAME}')
    model = build_model(config)
    logger.info(str(model))
    logger.info(f'number of params: {sum(p.numel() for p in model.parameters() if p.requires_grad)}')
    logger.info(f'number of GFLOPs: {model.flops() / 1e9}')
    if config.MODEL.PRETRAINED:
        load_pretrained(config, model, logger)
    model.to(device)
    model_without_ddp = model
    if runtime.distributed:
        model = DistributedDataParallel(model, device_ids=[runtime.local_rank] if device.type == 'cuda' else None,
                                        broadcast_buffers=False)
    amp = config.AMP_ENABLE and device.type == 'cuda'
    optimizer = build_optimizer(config, model_without_ddp)
    steps_per_epoch = len(train_loader) // config.TRAIN.ACCUMULATION_STEPS
    lr_scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler('cuda', enabled=amp)
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()
    elif config.MODEL.LABEL_SMOOTHING > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    def validate():
        stats = engine.evaluate(model, val_loader, device, amp=amp, sharded=sharded,
                                print_freq=config.PRINT_FREQ, echo=logger.info)
        logger.info(f" * Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f}")
        logger.info(f"Accuracy of the network on the {stats['images']} test images: {stats['acc1']:.1f}%")
        return stats

    max_accuracy, start_epoch = 0.0, config.TRAIN.START_EPOCH
    resume = config.MODEL.RESUME
    auto = os.path.join(config.OUTPUT, 'ckpt.pth')
    if not resume and config.TRAIN.AUTO_RESUME and os.path.isfile(auto):
        resume = auto
        logger.info(f'auto resuming from {auto}')
    if resume:
        ckpt = checkpoint.load(resume)
        checkpoint.load_weights(model_without_ddp, checkpoint.model_state(ckpt, keys=('model',)), source=resume)
        if not config.EVAL_MODE and all(k in ckpt for k in ('optimizer', 'lr_scheduler', 'epoch')):
            optimizer.load_state_dict(ckpt['optimizer'])
            lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
            if ckpt.get('scaler'):
                scaler.load_state_dict(ckpt['scaler'])
            start_epoch, max_accuracy = ckpt['epoch'] + 1, ckpt.get('max_accuracy', 0.0)
            logger.info(f"=> loaded {resume} (epoch {ckpt['epoch']}); continuing at epoch {start_epoch}")
        stats = validate()
        if config.EVAL_MODE:
            return stats
    if config.THROUGHPUT_MODE:
        return throughput(val_loader, model, logger)

    logger.info('Start training')
    start_time = time.time()
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        data.start_epoch(train_sampler, epoch, config.SEED, runtime.rank)
        epoch_start = time.time()
        engine.train_one_epoch(model, criterion, train_loader, optimizer, scaler, device, epoch, amp=amp,
                               clip_grad=config.TRAIN.CLIP_GRAD, mixup_fn=mixup_fn,
                               accumulation_steps=config.TRAIN.ACCUMULATION_STEPS,
                               step_update=lr_scheduler.step_update, print_freq=config.PRINT_FREQ, echo=logger.info)
        logger.info(f'EPOCH {epoch} training takes {datetime.timedelta(seconds=int(time.time() - epoch_start))}')
        stats = validate()
        improved = stats['acc1'] > max_accuracy
        max_accuracy = max(max_accuracy, stats['acc1'])
        logger.info(f'Max accuracy: {max_accuracy:.2f}%')
        scheduled = epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1
        if runtime.is_main and (scheduled or improved):
            state = {'model': model_without_ddp.state_dict(), 'optimizer': optimizer.state_dict(),
                     'lr_scheduler': lr_scheduler.state_dict(), 'max_accuracy': max_accuracy,
                     'scaler': scaler.state_dict(), 'epoch': epoch, 'config': json.loads(json.dumps(config))}
            path, best = os.path.join(config.OUTPUT, 'ckpt.pth'), os.path.join(config.OUTPUT, 'model_best.pth')
            if scheduled:
                checkpoint.save_atomic(state, path)
                logger.info(f'{path} saved')
            if improved:  # between SAVE_FREQ epochs too, so that the best epoch is never lost
                checkpoint.save_atomic(state, best)
                logger.info(f'{best} saved (top-1 {max_accuracy:.2f}%)')
    logger.info(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    return stats if start_epoch < config.TRAIN.EPOCHS else None


if __name__ == '__main__':
    _, cfg = parse_option()
    check_supported(cfg)
    main(cfg)
    shutdown()
