"""PVTv2 (+ ISTA2) ImageNet classification with the upstream PVT/DeiT command line.

    torchrun --nproc_per_node N --master_port 11000 main.py --config configs/pvt_v2_ista2/pvt_v2_b0_ista2.py \
        --data-path /path/to/imagenet [--output_dir DIR --batch-size B]
    torchrun --nproc_per_node 1 main.py --eval --config CFG --resume CKPT --data-path DATA

Runs on GPUs (NCCL) or CPUs (gloo). Values in the --config file fill in flags that were not
given on the command line; an explicit flag wins.
"""
import argparse
import copy
import datetime
import difflib
import json
import os
import sys
import time

import torch
from mmengine.config import Config
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer
from timm.scheduler import create_scheduler
from torch.nn.parallel import DistributedDataParallel
from torchvision import datasets

from common import checkpoint, data, engine
from common.runtime import init_runtime, seed_all, shutdown

from pvt_v2 import create_model


def get_args_parser():
    p = argparse.ArgumentParser('PVTv2 + ISTA2 training and evaluation', add_help=True)
    p.add_argument('--config', required=True, help='mmengine python config, e.g. configs/pvt_v2_ista2/pvt_v2_b0.py')
    p.add_argument('--fp32-resume', action='store_true', help='no AMP for the first 2 epochs after resuming')
    p.add_argument('--batch-size', type=int, default=128, help='per process; evaluation uses 1.5x')
    p.add_argument('--epochs', type=int, default=300)
    # model
    p.add_argument('--model', default='pvt_small', help='pvt_v2_b0 ... pvt_v2_b5, pvt_v2_b2_li (set by the config)')
    p.add_argument('--input-size', type=int, default=224)
    p.add_argument('--drop', type=float, default=0.0, help='dropout rate')
    p.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate')
    # optimizer
    p.add_argument('--opt', default='adamw')
    p.add_argument('--opt-eps', type=float, default=1e-8)
    p.add_argument('--opt-betas', type=float, nargs='+', default=None)
    p.add_argument('--clip-grad', type=float, default=None, help='max gradient norm (default: no clipping)')
    p.add_argument('--momentum', type=float, default=0.9)
    p.add_argument('--weight-decay', type=float, default=0.05)
    # learning-rate schedule; lr, warmup-lr and min-lr are for a total batch of 512 and scaled linearly
    p.add_argument('--sched', default='cosine')
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--lr-noise', type=float, nargs='+', default=None)
    p.add_argument('--lr-noise-pct', type=float, default=0.67)
    p.add_argument('--lr-noise-std', type=float, default=1.0)
    p.add_argument('--warmup-lr', type=float, default=1e-6)
    p.add_argument('--min-lr', type=float, default=1e-5)
    p.add_argument('--decay-epochs', type=float, default=30)
    p.add_argument('--warmup-epochs', type=int, default=5)
    p.add_argument('--cooldown-epochs', type=int, default=10)
    p.add_argument('--patience-epochs', type=int, default=10)
    p.add_argument('--decay-rate', '--dr', type=float, default=0.1)
    # augmentation
    p.add_argument('--color-jitter', type=float, default=0.4)
    p.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help='timm auto-augment policy')
    p.add_argument('--smoothing', type=float, default=0.1)
    p.add_argument('--train-interpolation', default='bicubic')
    p.add_argument('--repeated-aug', action='store_true')
    p.add_argument('--no-repeated-aug', action='store_false', dest='repeated_aug')
    p.set_defaults(repeated_aug=True)
    p.add_argument('--reprob', type=float, default=0.25)
    p.add_argument('--remode', default='pixel')
    p.add_argument('--recount', type=int, default=1)
    p.add_argument('--resplit', action='store_true', default=False)
    p.add_argument('--mixup', type=float, default=0.8)
    p.add_argument('--cutmix', type=float, default=1.0)
    p.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    p.add_argument('--mixup-prob', type=float, default=1.0)
    p.add_argument('--mixup-switch-prob', type=float, default=0.5)
    p.add_argument('--mixup-mode', default='batch')
    # data and run control
    p.add_argument('--finetune', default='', help='initialise from this checkpoint (head dropped if it does not fit)')
    p.add_argument('--data-path', default='/datasets01/imagenet_full_size/061417/')
    p.add_argument('--data-set', default='IMNET', choices=['CIFAR', 'IMNET', 'INAT', 'INAT19'])
    p.add_argument('--use-mcloader', action='store_true', default=False)
    p.add_argument('--inat-category', default='name')
    p.add_argument('--output_dir', default='', help='where to save; empty saves nothing')
    p.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--resume', default='', help='checkpoint to resume from (default: OUTPUT_DIR/checkpoint.pth)')
    p.add_argument('--start_epoch', type=int, default=0)
    p.add_argument('--eval', action='store_true')
    p.add_argument('--dist-eval', action='store_true', default=False, help='split evaluation across processes')
    p.add_argument('--shuffle-eval', action='store_true', default=False,
                   help='evaluate in one random order fixed by --seed instead of class order (not upstream)')
    p.add_argument('--num_workers', type=int, default=10)
    p.add_argument('--pin-mem', action='store_true')
    p.add_argument('--no-pin-mem', action='store_false', dest='pin_mem')
    p.set_defaults(pin_mem=True)
    p.add_argument('--world_size', type=int, default=1, help='set by torchrun through WORLD_SIZE')
    p.add_argument('--dist_url', default='env://', help='only env:// (torchrun) is supported')
    return p


def explicit_dests(parser, argv):
    """Names of the options given on the command line (abbreviations included)."""
    shadow = copy.deepcopy(parser)
    for action in shadow._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(shadow.parse_args(argv)))


def config_value(action, key, value, path):
    """`value` checked (and converted, int -> float) against the flag's type."""
    if value is None:
        return value
    kind = bool if action.const is True or action.const is False else (action.type or str)
    if action.nargs == '+':
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)
        expected = 'a list of numbers'
    else:
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int) and not isinstance(value, bool))
        ok = ok and not (kind in (int, float) and isinstance(value, bool))
        expected = kind.__name__
    if not ok:
        raise TypeError(f'{path}: {key}={value!r} has type {type(value).__name__}; expected {expected}')
    return list(value) if action.nargs == '+' else (float(value) if kind is float else value)


def apply_config(args, parser, argv):
    """Copy the config's cfg dict onto args, except keys whose flag was given explicitly."""
    if not os.path.isfile(args.config):
        raise FileNotFoundError(f'config file {args.config!r} does not exist')
    given = explicit_dests(parser, argv)
    actions = {a.dest: a for a in parser._actions if a.dest != 'help'}
    args.ista2_args = {}
    for section, values in Config.fromfile(args.config).to_dict().items():
        if not isinstance(values, dict):
            raise TypeError(f'{args.config}: top-level {section!r} must be a dict, as in cfg = dict(model=...)')
        for key, value in values.items():
            if key == 'ista2_args':
                if not isinstance(value, dict):
                    raise TypeError(f'{args.config}: ista2_args must be a dict of ISTA2 options, got {value!r}')
                args.ista2_args = dict(value)
            elif key not in actions:
                hint = difflib.get_close_matches(key, list(actions) + ['ista2_args'], n=1)
                raise KeyError(f'{args.config}: unknown config key {key!r}'
                               + (f' (did you mean {hint[0]!r}?)' if hint else '')
                               + '; valid keys are the dest names of the command-line flags and ista2_args')
            elif key in given:
                if int(os.environ.get('RANK', 0)) == 0:
                    print(f'config {args.config} sets {key}={value!r}; '
                          f'the command line value {getattr(args, key)!r} wins')
            else:
                setattr(args, key, config_value(actions[key], key, value, args.config))


def check_unused(args):
    """Flags upstream accepts that would have no effect here are errors, not silently ignored."""
    if args.dist_url != 'env://':
        raise ValueError(f'--dist_url {args.dist_url}: only env:// is supported; launch with torchrun')
    world = int(os.environ.get('WORLD_SIZE', 1))
    if args.world_size not in (1, world):
        raise ValueError(f'--world_size {args.world_size}, but WORLD_SIZE is {world}: the number of processes comes '
                         f'from torchrun --nproc_per_node (and --nnodes), so drop --world_size')
    if args.resplit:
        raise ValueError('--resplit only acts with augmentation splits, which neither upstream nor this trainer '
                         'uses; drop it')


def build_datasets(args):
    if args.use_mcloader:
        raise ValueError('--use-mcloader (memcached ImageNet) is not supported; use an image folder')
    if args.data_set == 'IMNET':
        train_set, val_set = data.image_folders(args.data_path)
        num_classes = len(train_set.classes)
    elif args.data_set == 'CIFAR':
        train_set, val_set = (datasets.CIFAR100(args.data_path, train=t, download=False) for t in (True, False))
        num_classes = 100
    else:
        raise ValueError(f'--data-set {args.data_set} is not supported; valid: IMNET (any image folder), CIFAR')
    train_set.transform = data.train_transform(
        args.input_size, args.color_jitter, args.aa, args.train_interpolation, args.reprob, args.remode, args.recount)
    val_set.transform = data.eval_transform(args.input_size)
    return train_set, val_set, num_classes


def main(args):
    runtime = init_runtime(args.device)
    device = runtime.device

    def echo(*a):
        if runtime.is_main:
            print(*a, flush=True)

    seed_all(args.seed, runtime.rank)
    torch.backends.cudnn.benchmark = True

    train_set, val_set, num_classes = build_datasets(args)
    pin = args.pin_mem and device.type == 'cuda'
    train_sampler = data.train_sampler(train_set, runtime, 'repeated' if args.repeated_aug else 'distributed',
                                         args.seed)
    train_loader = data.loader(train_set, train_sampler, args.batch_size, args.num_workers, pin, True)
    val_sampler = data.eval_sampler(val_set, runtime, args.dist_eval, shuffle=args.shuffle_eval, seed=args.seed)
    val_loader = data.loader(val_set, val_sampler, int(1.5 * args.batch_size), args.num_workers, pin, False)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)

    echo(f'Creating model: {args.model}')
    model = create_model(args.model, num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                         ista2_args=args.ista2_args)
    if args.finetune:
        load_finetune_weights(model, args.finetune, echo)
    model.to(device)
    model_without_ddp = model
    if runtime.distributed:
        model = DistributedDataParallel(model, device_ids=[runtime.local_rank] if device.type == 'cuda' else None)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    echo(f'number of params: {n_parameters}')

    scale = args.batch_size * runtime.world_size / 512.0
    args.lr, args.warmup_lr, args.min_lr = args.lr * scale, args.warmup_lr * scale, args.min_lr * scale
    optimizer = create_optimizer(args, model_without_ddp)
    lr_scheduler, _ = create_scheduler(args, optimizer)
    scaler = torch.amp.GradScaler('cuda', enabled=device.type == 'cuda')
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    output_dir = args.output_dir
    resume = args.resume
    if not resume and output_dir and os.path.isfile(os.path.join(output_dir, 'checkpoint.pth')):
        resume = os.path.join(output_dir, 'checkpoint.pth')
        echo(f'Found {resume}: resuming from it')
    max_accuracy, resumed = 0.0, False
    if resume:
        ckpt = checkpoint.load(resume)
        state = checkpoint.model_state(ckpt, keys=('model',))
        bare = state is ckpt  # a released state_dict: the new ISTA2 norms may be missing
        missing = checkpoint.load_weights(model_without_ddp, state, source=resume,
                                          allowed_missing=('.ista2.',) if bare else ())
        if missing:
            echo(f'{resume} has no values for {len(missing)} ISTA2 keys, left at their initial values: {missing}')
        if not args.eval and not bare and all(k in ckpt for k in ('optimizer', 'lr_scheduler', 'epoch')):
            optimizer.load_state_dict(ckpt['optimizer'])
            lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
            if ckpt.get('scaler'):
                scaler.load_state_dict(ckpt['scaler'])
            args.start_epoch = ckpt['epoch'] + 1
            max_accuracy = ckpt.get('max_accuracy', 0.0)
            resumed = True
            echo(f'Resumed from {resume} at epoch {args.start_epoch}')
    if args.eval:
        if not resume:
            raise ValueError('--eval needs a checkpoint: --resume PATH, or an --output_dir holding checkpoint.pth')
        stats = engine.evaluate(model, val_loader, device, sharded=args.dist_eval, echo=echo)
        echo(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f}")
        echo(f"Accuracy of the network on the {stats['images']} test images: {stats['acc1']:.1f}%")
        return stats
    if args.start_epoch >= args.epochs:
        echo(f'Nothing to train: the checkpoint has finished epoch {args.start_epoch - 1} of {args.epochs}')
        return None

    echo(f'Start training for {args.epochs} epochs')
    start_time = time.time()
    fp32_until = args.start_epoch + 2 if args.fp32_resume and resumed else -1
    for epoch in range(args.start_epoch, args.epochs):
        data.start_epoch(train_sampler, epoch, args.seed, runtime.rank)
        amp = epoch >= fp32_until
        train_stats = engine.train_one_epoch(
            model, criterion, train_loader, optimizer, scaler if amp else torch.amp.GradScaler(enabled=False),
            device, epoch, amp=amp, clip_grad=args.clip_grad, mixup_fn=mixup_fn, echo=echo)
        lr_scheduler.step(epoch)  # as upstream, after the epoch with the finished epoch's index
        test_stats = engine.evaluate(model, val_loader, device, amp=amp, sharded=args.dist_eval, echo=echo)
        echo(f"Accuracy of the network on the {test_stats['images']} test images: {test_stats['acc1']:.1f}%")
        improved = test_stats['acc1'] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats['acc1'])
        echo(f'Max accuracy: {max_accuracy:.2f}%')
        if output_dir and runtime.is_main:
            path = os.path.join(output_dir, 'checkpoint.pth')
            checkpoint.save_atomic({
                'model': model_without_ddp.state_dict(), 'optimizer': optimizer.state_dict(),
                'lr_scheduler': lr_scheduler.state_dict(), 'epoch': epoch, 'scaler': scaler.state_dict(),
                'args': plain_args(args), 'max_accuracy': max_accuracy}, path)
            if improved:
                checkpoint.copy_atomic(path, os.path.join(output_dir, 'model_best.pth'))
            log = {**{f'train_{k}': v for k, v in train_stats.items()}, **{f'test_{k}': v for k, v in test_stats.items()
                   if k != 'images'}, 'epoch': epoch, 'n_parameters': n_parameters}
            with open(os.path.join(output_dir, 'log.txt'), 'a') as f:
                f.write(json.dumps(log) + '\n')
    echo(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    return test_stats


def load_finetune_weights(model, path, echo):
    """Initialise from a checkpoint, dropping a classifier head whose shape does not fit."""
    state = dict(checkpoint.model_state(checkpoint.load(path)))
    own = model.state_dict()
    for key in ('head.weight', 'head.bias'):
        if key in state and state[key].shape != own[key].shape:
            echo(f'Removing key {key} from the pretrained checkpoint (shape {tuple(state[key].shape)})')
            del state[key]
    missing = checkpoint.load_weights(model, state, strict=False, source=path)
    echo(f'Fine-tuning from {path}; not in the checkpoint: {missing}')


def plain_args(args):
    """args as a dict of plain values, loadable with torch.load(weights_only=True)."""
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(args).items()}


def cli(argv=None):
    parser = get_args_parser()
    argv = argv if argv is not None else sys.argv[1:]
    args = parser.parse_args(argv)
    apply_config(args, parser, argv)
    check_unused(args)
    if args.output_dir:
        checkpoint.prepare_output(args.output_dir, '--output_dir')
    main(args)
    shutdown()


if __name__ == '__main__':
    cli()
