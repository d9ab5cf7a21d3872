"""PVTv2 (+ ISTA2) ImageNet classification with the upstream PVT/DeiT command line.

    torchrun --nproc_per_node N --master_port 11000 main.py --config configs/pvt_v2_ista2/pvt_v2_b0_ista2.py \
        --data-path /path/to/imagenet [--output_dir DIR --batch-size B]
    torchrun --nproc_per_node 1 main.py --eval --config CFG --resume CKPT --data-path DATA

Runs on GPUs (NCCL) or CPUs (gloo). Values in the --config file fill in flags that were not
given on the command line; an explicit flag wins.
"""
import argparse
import copy
import difflib
import os
import sys

from mmengine.config import Config
from timm.optim import optimizer_kwargs
from timm.scheduler.scheduler_factory import scheduler_kwargs
from torchvision import datasets

from common import checkpoint, data, trainer
from common.errors import ConfigError, ConfigKeyError, require_config_file
from common.ista2_options import EVAL_ALIGNS

from pvt_v2 import create_model


def get_args_parser():
    p = argparse.ArgumentParser('PVTv2 + ISTA2 training and evaluation', add_help=True)
    p.add_argument('--config', required=True, help='mmengine python config, e.g. configs/pvt_v2_ista2/pvt_v2_b0.py')
    p.add_argument('--fp32-resume', action='store_true', help='no AMP for the first 2 epochs after resuming')
    p.add_argument('--batch-size', type=int, default=128, help='per process; evaluation uses 1.5x')
    p.add_argument('--epochs', type=int, default=300)
    # model
    p.add_argument('--model', default='pvt_v2_b0', help='pvt_v2_b0 ... pvt_v2_b5, pvt_v2_b2_li (set by the config)')
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
    p.add_argument('--eval-protocol', default='class-order', choices=list(trainer.PROTOCOLS),
                   help='validation order and batch: class order (upstream), one order shuffled with --seed, or one '
                        'image per batch (not upstream)')
    p.add_argument('--shuffle-eval', action='store_true', default=False, help='the same as --eval-protocol shuffled')
    p.add_argument('--eval-align', default=None, choices=EVAL_ALIGNS,
                   help="what ISTA2 aligns against at evaluation: replaces the config's ista2_args['eval_align'] "
                        '(not upstream)')
    p.add_argument('--rebuild-bank', action='store_true', default=False,
                   help="refill the ISTA2 banks of --resume (or OUTPUT_DIR/checkpoint.pth) from training images and "
                        'write <name>_bank.pth (not upstream)')
    p.add_argument('--data-in-memory', action='store_true', default=False,
                   help='decode the image folders once into memory before the first epoch; for small data sets '
                        'such as CIFAR-10 (not upstream)')
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
        ok = isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value)
        expected = 'a list of numbers'
    else:
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int) and not isinstance(value, bool))
        ok = ok and not (kind in (int, float) and isinstance(value, bool))
        expected = kind.__name__
    if not ok:
        raise ConfigError(f'{path}: {key}={value!r} has type {type(value).__name__}; expected {expected}')
    return list(value) if action.nargs == '+' else (float(value) if kind is float else value)


def apply_config(args, parser, argv):
    """Copy the config's cfg dict onto args, except keys whose flag was given explicitly."""
    require_config_file(args.config, 'configs', '.py')
    given = explicit_dests(parser, argv)
    actions = {a.dest: a for a in parser._actions if a.dest != 'help'}
    args.ista2_args = {}
    for section, values in Config.fromfile(args.config).to_dict().items():
        if not isinstance(values, dict):
            raise ConfigError(f'{args.config}: top-level {section!r} must be a dict, as in cfg = dict(model=...)')
        for key, value in values.items():
            if key == 'ista2_args':
                if not isinstance(value, dict):
                    raise ConfigError(f'{args.config}: ista2_args must be a dict of ISTA2 options, got {value!r}')
                args.ista2_args = dict(value)
            elif key not in actions:
                hint = difflib.get_close_matches(key, list(actions) + ['ista2_args'], n=1)
                raise ConfigKeyError(f'{args.config}: unknown config key {key!r}'
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
        raise ConfigError(f'--dist_url {args.dist_url}: only env:// is supported; launch with torchrun')
    world = int(os.environ.get('WORLD_SIZE', 1))
    if args.world_size not in (1, world):
        raise ConfigError(f'--world_size {args.world_size}, but WORLD_SIZE is {world}: the number of processes comes '
                         f'from torchrun --nproc_per_node (and --nnodes), so drop --world_size')
    if args.resplit:
        raise ConfigError('--resplit only acts with augmentation splits, which neither upstream nor this trainer '
                         'uses; drop it')
    if args.eval and args.rebuild_bank:
        raise ConfigError('--eval and --rebuild-bank: give one; --rebuild-bank writes a checkpoint to evaluate next')
    if args.inat_category != 'name':
        raise ConfigError(f'--inat-category {args.inat_category} only applies to the iNaturalist data sets, which are '
                          f'not supported here; drop it')


def build_datasets(args):
    if args.use_mcloader:
        raise ConfigError('--use-mcloader (memcached ImageNet) is not supported; use an image folder')
    if args.data_set == 'IMNET':
        train_set, val_set = data.image_folders(args.data_path)
    elif args.data_set == 'CIFAR':
        train_set, val_set = (datasets.CIFAR100(args.data_path, train=t, download=False) for t in (True, False))
    else:
        raise ConfigError(f'--data-set {args.data_set} is not supported; valid: IMNET (any image folder), CIFAR')
    train_set.transform = data.train_transform(
        args.input_size, args.color_jitter, args.aa, args.train_interpolation, args.reprob, args.remode, args.recount)
    val_set.transform = data.eval_transform(args.input_size)
    return train_set, val_set


# the names of the trainer settings on this command line, for messages
NAMES = {'epochs': '--epochs', 'warmup_epochs': '--warmup-epochs', 'batch_size': '--batch-size',
         'eval_batch_size': '--batch-size (x1.5 for evaluation)', 'workers': '--num_workers',
         'start_epoch': '--start_epoch', 'lr': '--lr', 'weight_decay': '--weight-decay', 'clip_grad': '--clip-grad',
         'smoothing': '--smoothing', 'resume': '--resume', 'evaluate': '--eval', 'folder': 'an --output_dir',
         'protocol': '--eval-protocol', 'eval_align': "--eval-align or ista2_args['eval_align']",
         'rebuild_bank': '--rebuild-bank', 'in_memory': '--data-in-memory'}


def main(args):
    """Train, or evaluate with --eval; returns the run's result (see common.trainer)."""
    session = trainer.setup(args.seed, args.device, output=args.output_dir or None, output_option='--output_dir')
    train_set, val_set = build_datasets(args)
    num_classes = len(train_set.classes)
    session.log(f'Creating model: {args.model}')
    model = create_model(args.model, num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                         ista2_args=args.ista2_args)
    if args.finetune:
        load_finetune_weights(model, args.finetune, session.log)
    scale = args.batch_size * session.runtime.world_size / 512.0  # lr, warmup-lr and min-lr are for a batch of 512
    args.lr, args.warmup_lr, args.min_lr = args.lr * scale, args.warmup_lr * scale, args.min_lr * scale
    mixup = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode)
    out = args.output_dir or None
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    recipe = trainer.Recipe(
        train_set, val_set, names=NAMES, seed=args.seed, batch_size=args.batch_size,
        eval_batch_size=int(1.5 * args.batch_size), workers=args.num_workers, pin_memory=args.pin_mem,
        in_memory=args.data_in_memory,
        train_sampler='repeated' if args.repeated_aug else 'distributed', eval_sharded=args.dist_eval,
        protocol=trainer.resolve_protocol(args.eval_protocol, '--eval-protocol', args.shuffle_eval, '--shuffle-eval'),
        epochs=args.epochs, start_epoch=args.start_epoch,
        optimizer=optimizer_kwargs(args), param_groups=lambda m: m,  # timm's split: no decay on 1-D and biases
        scheduler=scheduler_kwargs(args), scheduler_lag=1,  # stepped after each epoch with its own index (DeiT)
        mixup=mixup, smoothing=args.smoothing, clip_grad=args.clip_grad,
        fp32_epochs_after_resume=2 if args.fp32_resume else 0,
        checkpoints=trainer.Checkpoints(out, extra={'args': plain_args(args)}, resume=args.resume),
        epoch_logs=[trainer.JsonLines(os.path.join(out, 'log.txt'), n_parameters=n_parameters)] if out else [])
    if args.eval:
        return trainer.evaluate(session, model, recipe)
    if args.rebuild_bank:
        return trainer.rebuild_bank(session, model, recipe)
    return trainer.train(session, model, recipe)


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
    """The command line: parse, apply the --config file, run; returns the run's result."""
    parser = get_args_parser()
    argv = argv if argv is not None else sys.argv[1:]
    args = parser.parse_args(argv)
    apply_config(args, parser, argv)
    check_unused(args)
    if args.eval_align is not None:
        args.ista2_args['eval_align'] = args.eval_align
    return main(args)


if __name__ == '__main__':
    trainer.run_cli(cli)
