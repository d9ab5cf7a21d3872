"""The training run, written once for every trainer: set-up, the epoch loop, evaluation, resume,
checkpoints and logs.

A backbone's front end (PVT's main.py, Swin's main.py, CvT's tools/train.py and tools/test.py)
translates its command line and config into plain values, then:

    session = setup(seed, output=...)              # processes, seeds, output folder, logger
    model = <its own model>                        # built after seeding, as upstream
    train(session, model, Recipe(...))             # or evaluate(session, model, recipe)

Nothing here asks which backbone it serves: what differs (data transforms, optimizer and
scheduler settings in timm's vocabulary, when the scheduler steps, checkpoint file and key names,
log formats) comes in the Recipe.
"""
import copy
import datetime
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from common import checkpoint, data, engine
from common.errors import ConfigError, UserError
from common.ista2 import bank_layers, rebuild_banks
from common.runtime import Runtime, init_runtime, seed_all, shutdown

# Evaluation protocols: the order of the validation set and the evaluation batch size. 'class-order' is
# the reference protocol (ImageFolder order, so batches mostly hold one class); ISTA2 aligns each image
# with the others of its batch, so its predictions depend on the protocol, a plain model's do not.
PROTOCOLS = {'class-order': dict(shuffle=False, batch_size=None),
             'shuffled': dict(shuffle=True, batch_size=None),  # one random order, fixed by the seed
             'batch-1': dict(shuffle=False, batch_size=1)}  # no other image to align with


def resolve_protocol(protocol, option, shuffle=False, shuffle_option=None):
    """The protocol named by `option`; a set `shuffle_option` (each trainer's older switch) means 'shuffled'."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f'{option} {protocol!r}; valid: {", ".join(PROTOCOLS)}')
    if shuffle and protocol not in ('class-order', 'shuffled'):
        raise ConfigError(f'{shuffle_option} contradicts {option} {protocol}; drop one of them')
    return 'shuffled' if shuffle else protocol


def run_cli(main, *args):
    """A trainer script's entry point: main(*args), then leave the process group; a user error is one line on
    stderr and exit status 2 (common.errors)."""
    try:
        result = main(*args)
    except UserError as error:
        print(f'error: {error}', file=sys.stderr, flush=True)
        sys.exit(2)
    shutdown()
    return result


@dataclass
class Session:
    """The process's runtime, its logger (rank 0 prints) and the output folder (None: none)."""
    runtime: Runtime
    log: Callable[[str], None]
    output: str | None


def setup(seed, device=None, output=None, output_option='the output folder', log_file=None,
          log_format='%(message)s', logger_name='ista2', cudnn=None):
    """Join the process group, seed every generator with seed + rank (before the model is built, as
    upstream), probe the output folder, and open a logger writing to the console on rank 0 and to
    `log_file` (a name inside `output`, formatted with the rank) on every rank."""
    runtime = init_runtime(device)
    seed_all(seed, runtime.rank)
    for flag, value in {'benchmark': True, **(cudnn or {})}.items():
        setattr(torch.backends.cudnn, flag, value)
    if output:
        checkpoint.prepare_output(output, output_option)
    logger = logging.getLogger(logger_name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):  # a second run in the same process starts clean
        logger.removeHandler(handler)
        handler.close()
    handlers = [logging.StreamHandler(sys.stdout)] if runtime.is_main else []
    if output and log_file:
        handlers.append(logging.FileHandler(os.path.join(output, log_file.format(rank=runtime.rank)), mode='a'))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(log_format))
        logger.addHandler(handler)
    return Session(runtime, logger.info, output)


@dataclass
class Checkpoints:
    """A trainer's checkpoint files and key names (each trainer keeps its upstream layout)."""
    folder: str | None  # None: nothing is saved or resumed from a folder
    latest: str = 'checkpoint.pth'  # written after every `save_every`-th epoch and the last
    model_key: str = 'model'  # the state_dict's key inside `latest`
    best_key: str = 'max_accuracy'  # the best top-1 so far
    stores_next_epoch: bool = False  # 'epoch' holds the next epoch to run (CvT), not the last finished
    best_bare: bool = False  # model_best.pth holds the bare state_dict (CvT), not a whole checkpoint
    save_every: int = 1
    each_epoch: bool = False  # also model_<epoch>.pth, bare (CvT's TRAIN.SAVE_ALL_MODELS)
    final_state: bool = False  # final_state.pth, bare, when training ends (CvT)
    extra: dict = field(default_factory=dict)  # plain values stored beside the weights (args, config, ...)
    resume: str = ''  # an explicit checkpoint: it must exist
    auto_resume: bool = True  # otherwise resume from folder/latest when it exists
    eval_file: str = 'checkpoint.pth'  # what evaluation loads from `folder` when no checkpoint is named
    tolerated_missing: tuple = ()  # key patterns any checkpoint may lack (e.g. CvT's bg_token)


def default_summary(stats):
    return [f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f}",
            f"Accuracy of the network on the {stats['images']} test images: {stats['acc1']:.1f}%"]


@dataclass
class Recipe:
    """What a trainer decides, as plain values. Optimizer and scheduler settings are keywords of
    timm's create_optimizer_v2 / create_scheduler_v2 (`step_on_epochs=False` steps the schedule after
    every optimizer update); `names` maps the setting names used here to the user's own options
    (e.g. {'epochs': '--epochs'}), so that every message names what the user typed."""
    train_set: object
    val_set: object
    checkpoints: Checkpoints
    batch_size: int
    eval_batch_size: int
    epochs: int = 0
    workers: int = 0
    names: dict = field(default_factory=dict)
    pin_memory: bool = True
    in_memory: bool = False  # decode the image folders once into memory (data.hold_in_memory)
    train_sampler: str = 'distributed'  # or 'repeated' (DeiT's repeated augmentation)
    eval_sharded: bool = True  # each rank evaluates its own share, or every rank all of it
    protocol: str = 'class-order'
    seed: int = 0
    start_epoch: int = 0
    optimizer: dict = field(default_factory=dict)
    param_groups: Callable = None  # model -> parameter groups, or the model for timm's default split
    scheduler: dict = field(default_factory=dict)
    scheduler_lag: int = 0  # per-epoch schedules: after epoch e the schedule is set to epoch e + 1 - lag
    mixup: dict | None = None  # timm Mixup keywords, less label_smoothing and num_classes
    smoothing: float = 0.
    clip_grad: float | None = None
    accumulation_steps: int = 1
    amp: bool = True  # fp16 autocast and a grad scaler in training (CUDA only)
    eval_amp: bool = True
    fp32_epochs_after_resume: int = 0
    eval_from_epoch: int = 0
    validate_after_resume: bool = False
    detect_anomaly: bool = False
    ddp: dict = field(default_factory=dict)  # DistributedDataParallel keywords
    print_freq: int = 10
    epoch_logs: list = field(default_factory=list)  # rank 0 calls each with (epoch, train stats, test stats)
    summary: Callable = default_summary  # evaluation stats -> log lines

    def name(self, setting):
        return self.names.get(setting, setting)


def check_numbers(recipe, training):
    """Out-of-range numbers are errors naming the user's option."""
    rules = {'batch_size': 1, 'eval_batch_size': 1, 'workers': 0, 'print_freq': 1}
    if training:
        rules.update(epochs=1, accumulation_steps=1, start_epoch=0, eval_from_epoch=0)
    for setting, low in rules.items():
        value = getattr(recipe, setting)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f'{recipe.name(setting)} {value!r}: must be an integer >= {low}')
    if training:
        for key, low in (('lr', 0.), ('weight_decay', 0.)):
            value = recipe.optimizer.get(key)
            if value is not None and not value >= low:
                raise ConfigError(f'{recipe.name(key)} {value!r}: must be >= {low}')
        if recipe.clip_grad is not None and not recipe.clip_grad > 0:
            raise ConfigError(f'{recipe.name("clip_grad")} {recipe.clip_grad!r}: must be > 0 (or unset for none)')
        if not 0 <= recipe.smoothing < 1:
            raise ConfigError(f'{recipe.name("smoothing")} {recipe.smoothing!r}: must be in [0, 1)')


def eval_loader(session, recipe):
    """The validation loader of the recipe's protocol."""
    protocol = PROTOCOLS[resolve_protocol(recipe.protocol, recipe.name('protocol'))]
    sampler = data.eval_sampler(recipe.val_set, session.runtime, recipe.eval_sharded, protocol['shuffle'],
                                recipe.seed)
    return data.loader(recipe.val_set, sampler, protocol['batch_size'] or recipe.eval_batch_size, recipe.workers,
                       pin(session, recipe), False)


def hold_in_memory(session, recipe, *datasets):
    """With recipe.in_memory, decode each dataset's images once into memory (data.hold_in_memory)."""
    if recipe.in_memory:
        for images in datasets:
            data.hold_in_memory(images, recipe.name('in_memory'), session.log)


def pin(session, recipe):
    return recipe.pin_memory and session.runtime.device.type == 'cuda'


def validate(session, model, loader, recipe, amp):
    start = time.time()
    stats = engine.evaluate(model, loader, session.runtime.device, amp=amp, sharded=recipe.eval_sharded,
                            print_freq=recipe.print_freq, echo=session.log)
    for line in recipe.summary(stats):
        session.log(line)
    return {**stats, 'protocol': recipe.protocol, 'seconds': time.time() - start}


BANK_KEY = '.ista2.bank'  # in the keys of ISTA2's representative banks (bank, bank_count): evaluation state


def restore(model, path, recipe, log):
    """Load the weights at `path` into `model`, strictly; returns the checkpoint as read (see
    `training_state`). A bare state_dict (a released checkpoint) may lack ISTA2's norms. ISTA2's banks
    may be missing (they are rebuilt by the trainer's bank command) or extra (a model that does not
    evaluate against a bank leaves them out); both are reported."""
    ckpt = checkpoint.load(path)
    state = checkpoint.model_state(ckpt, keys=(recipe.checkpoints.model_key,))
    bare = state is ckpt
    own = model.state_dict()
    unused = [k for k in state if k not in own and BANK_KEY in k]
    if unused:
        log(f"{path} holds ISTA2 representative banks ({len(unused)} tensors) that this model does not use: its "
            f"ISTA2 layers evaluate with eval_align other than 'bank' ({recipe.name('eval_align')})")
        state = {k: v for k, v in state.items() if k not in unused}
    missing = checkpoint.load_weights(model, state, source=path, allowed_missing=recipe.checkpoints.tolerated_missing
                                      + ('.ista2.' if bare else BANK_KEY,))
    if missing:
        log(f'{path} has no values for {len(missing)} keys, left as this model initialised them: {missing}')
    if any(BANK_KEY in k for k in missing):
        log(f"{path} has no ISTA2 representative banks: layers with eval_align='bank' evaluate without alignment "
            f"until the banks are rebuilt from training images: {recipe.name('rebuild_bank')}")
    return ckpt


def is_bare(ckpt, recipe):
    """Whether the checkpoint is a bare state_dict (a released checkpoint), not a trainer's dict of weights and more."""
    return checkpoint.model_state(ckpt, keys=(recipe.checkpoints.model_key,)) is ckpt


def training_state(ckpt, recipe):
    """The checkpoint if it holds a training state (optimizer, epoch) beside the weights, else None."""
    return None if is_bare(ckpt, recipe) or not all(k in ckpt for k in ('optimizer', 'epoch')) else ckpt


def named_checkpoint(path, recipe):
    """`path`, a checkpoint the user named, if it is a file."""
    if not os.path.isfile(path):
        raise checkpoint.CheckpointError(f'{recipe.name("resume")} {path!r}: no such file')
    return path


def resume_path(ckpt_layout, recipe, log):
    if ckpt_layout.resume:
        return named_checkpoint(ckpt_layout.resume, recipe)
    latest = os.path.join(ckpt_layout.folder, ckpt_layout.latest) if ckpt_layout.folder else None
    if ckpt_layout.auto_resume and latest and os.path.isfile(latest):
        log(f'Found {latest}: resuming from it')
        return latest
    return None


def report(result):
    """Write `result` as JSON to $ISTA2_RESULT_FILE when set (rank 0): how scripts read a run's outcome."""
    path = os.environ.get('ISTA2_RESULT_FILE')
    if path and int(os.environ.get('RANK', 0)) == 0:
        checkpoint.write_text_atomic(json.dumps(result, indent=1), path)
    return result


def checkpoint_to_evaluate(recipe, action='evaluate'):
    """The checkpoint evaluation reads: the one named, else the folder's eval_file; `action` names the setting that
    asked for it in a message."""
    layout = recipe.checkpoints
    if layout.resume:
        return named_checkpoint(layout.resume, recipe)
    in_folder = os.path.join(layout.folder, layout.eval_file) if layout.folder else None
    if in_folder and os.path.isfile(in_folder):
        return in_folder
    raise ConfigError(f'{recipe.name(action)} needs a checkpoint: {recipe.name("resume")} PATH, or '
                      f'{recipe.name("folder")} holding {layout.eval_file}')


def evaluate(session, model, recipe):
    """Evaluate the recipe's checkpoint (named, or the folder's eval_file) under its protocol."""
    check_numbers(recipe, training=False)
    path = checkpoint_to_evaluate(recipe)
    restore(model, path, recipe, session.log)
    session.log(f'=> loaded {path}')
    model.to(session.runtime.device)
    hold_in_memory(session, recipe, recipe.val_set)
    stats = validate(session, model, eval_loader(session, recipe), recipe, recipe.eval_amp)
    return report({'checkpoint': path, **stats, 'peak_memory_mib': peak_memory_mib(session.runtime.device)})


def peak_memory_mib(device):
    """The process's peak memory so far: CUDA memory allocated on `device`, or on the CPU the peak resident set."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # KiB on Linux


def rebuild_bank(session, model, recipe):
    """Refill the ISTA2 representative banks of the recipe's checkpoint (as `evaluate` picks it) from training
    images, through the frozen model (evaluation transform, one seeded order, every rank its share), until
    every bank is full or the images run out; write the checkpoint with its new banks as <name>_bank.pth into
    the run's folder (beside the source without one), leaving the source as it was."""
    check_numbers(recipe, training=False)
    layers = bank_layers(model)
    if not layers:
        raise ConfigError(f"{recipe.name('rebuild_bank')}: this model has no ISTA2 layer with eval_align='bank'; set "
                          f"{recipe.name('eval_align')} to bank")
    path = checkpoint_to_evaluate(recipe, 'rebuild_bank')
    ckpt = restore(model, path, recipe, session.log)
    runtime = session.runtime
    model.to(runtime.device)
    hold_in_memory(session, recipe, recipe.train_set)
    images = copy.copy(recipe.train_set)
    images.transform = recipe.val_set.transform
    # every rank the same number of equal batches (padded), as each forward exchanges representatives
    sampler = DistributedSampler(images, runtime.world_size, runtime.rank, shuffle=True, seed=recipe.seed)
    loader = data.loader(images, sampler, recipe.eval_batch_size, recipe.workers, pin(session, recipe), False)
    with engine.autocast(runtime.device, recipe.eval_amp):
        seen = rebuild_banks(model, loader)
    filled = min(min(int(m.bank_count), m.bank_size) / m.bank_size for m in layers)
    stem, ext = os.path.splitext(os.path.basename(path))
    out = os.path.join(recipe.checkpoints.folder or os.path.dirname(path), f'{stem}_bank{ext or ".pth"}')
    if runtime.is_main:
        key = recipe.checkpoints.model_key
        checkpoint.save_atomic(model.state_dict() if is_bare(ckpt, recipe) else {**ckpt, key: model.state_dict()}, out)
    session.log(f'{out}: the banks of {len(layers)} ISTA2 layers rebuilt from {seen} training images '
                f'({filled:.0%} of the smallest bank filled); {path} is unchanged. Evaluate it with '
                f'{recipe.name("evaluate")} and {recipe.name("resume")} {out}')
    return report({'checkpoint': out, 'source': path, 'images': seen, 'layers': len(layers), 'filled': filled})


def train(session, model, recipe):
    """Train `model` for recipe.epochs epochs, resuming from the last checkpoint when there is one;
    evaluate after every epoch (from eval_from_epoch on), save, and log. Returns the last stats."""
    runtime, log, ckpt_layout = session.runtime, session.log, recipe.checkpoints
    device = runtime.device
    check_numbers(recipe, training=True)
    model.to(device)
    bare_model = model
    if runtime.distributed:
        model = DistributedDataParallel(model, device_ids=[runtime.local_rank] if device.type == 'cuda' else None,
                                        **recipe.ddp)
    n_parameters = sum(p.numel() for p in bare_model.parameters() if p.requires_grad)
    log(f'number of params: {n_parameters}')

    hold_in_memory(session, recipe, recipe.train_set, recipe.val_set)
    sampler = data.train_sampler(recipe.train_set, runtime, recipe.train_sampler, recipe.seed)
    train_loader = data.loader(recipe.train_set, sampler, recipe.batch_size, recipe.workers, pin(session, recipe),
                               True)
    val_loader = eval_loader(session, recipe)
    num_classes = len(recipe.train_set.classes)
    mixup = Mixup(**recipe.mixup, label_smoothing=recipe.smoothing, num_classes=num_classes) if recipe.mixup else None
    if mixup is not None:
        criterion = SoftTargetCrossEntropy()
    elif recipe.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=recipe.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    optimizer = create_optimizer_v2(recipe.param_groups(bare_model), **recipe.optimizer)
    updates_per_epoch = len(train_loader) // recipe.accumulation_steps
    scheduler, _ = create_scheduler_v2(optimizer, **recipe.scheduler, updates_per_epoch=updates_per_epoch)
    per_update = not recipe.scheduler.get('step_on_epochs', True)
    warn_if_only_warmup(recipe, log)
    amp = recipe.amp and device.type == 'cuda'
    scaler = torch.amp.GradScaler('cuda', enabled=amp)

    start, best, resumed = recipe.start_epoch, 0.0, False
    path = resume_path(ckpt_layout, recipe, log)
    if path:
        ckpt = training_state(restore(bare_model, path, recipe, log), recipe)
        if ckpt is not None:
            optimizer.load_state_dict(ckpt['optimizer'])
            if 'lr_scheduler' in ckpt:
                scheduler.load_state_dict(ckpt['lr_scheduler'])
            if ckpt.get('scaler'):
                scaler.load_state_dict(ckpt['scaler'])
            start = ckpt['epoch'] + (0 if ckpt_layout.stores_next_epoch else 1)
            best, resumed = ckpt.get(ckpt_layout.best_key, 0.0), True
            log(f'Resumed from {path} (epochs before {start} done); continuing at epoch {start}')
        if recipe.validate_after_resume:
            validate(session, model, val_loader, recipe, amp)
    final = 'final_state.pth' if ckpt_layout.final_state else ckpt_layout.latest
    result = {'epochs': recipe.epochs, 'best_acc1': best, 'test': None, 'train': None, 'n_parameters': n_parameters,
              'weights': os.path.join(ckpt_layout.folder, final) if ckpt_layout.folder else None,
              'process_group': dist.get_backend() if dist.is_initialized() else None}
    if start >= recipe.epochs:
        log(f'Nothing to train: epochs before {start} are done, and {recipe.name("epochs")} is {recipe.epochs}')
        return report(result)
    if not per_update and start - recipe.scheduler_lag >= 0:
        scheduler.step(start - recipe.scheduler_lag)
    torch.autograd.set_detect_anomaly(recipe.detect_anomaly)

    log(f'Start training for {recipe.epochs} epochs')
    run_start = time.time()
    fp32_until = start + recipe.fp32_epochs_after_resume if resumed else start
    try:
        for epoch in range(start, recipe.epochs):
            epoch_start = time.time()
            data.start_epoch(sampler, epoch, recipe.seed, runtime.rank)
            amp_now = amp and epoch >= fp32_until
            train_stats = engine.train_one_epoch(
                model, criterion, train_loader, optimizer, scaler if amp_now else torch.amp.GradScaler(enabled=False),
                device, epoch, amp=amp_now, clip_grad=recipe.clip_grad, mixup_fn=mixup,
                accumulation_steps=recipe.accumulation_steps, step_update=scheduler.step_update if per_update else None,
                print_freq=recipe.print_freq, echo=log)
            test_stats, improved = None, False
            if epoch >= recipe.eval_from_epoch:
                test_stats = validate(session, model, val_loader, recipe, recipe.eval_amp and amp_now)
                improved = test_stats['acc1'] > best
                best = max(best, test_stats['acc1'])
                log(f'Max accuracy: {best:.2f}%')
            if not per_update:
                scheduler.step(epoch + 1 - recipe.scheduler_lag)
            if runtime.is_main:
                save(bare_model, optimizer, scheduler, scaler, epoch, best, improved, recipe, log)
                for write in recipe.epoch_logs:
                    write(epoch, train_stats, test_stats)
            log(f'Epoch {epoch} done in {datetime.timedelta(seconds=int(time.time() - epoch_start))}; '
                f"lr {optimizer.param_groups[0]['lr']:.3g}")
            result.update(best_acc1=best, train=train_stats, test=test_stats or result['test'])
        if runtime.is_main and ckpt_layout.folder and ckpt_layout.final_state:
            checkpoint.save_atomic(bare_model.state_dict(), os.path.join(ckpt_layout.folder, 'final_state.pth'))
    finally:  # a crash too closes the logs it opened
        for write in recipe.epoch_logs:
            if hasattr(write, 'close'):
                write.close()
    log(f'Training time {datetime.timedelta(seconds=int(time.time() - run_start))}')
    return report(result)


def warn_if_only_warmup(recipe, log):
    """The same rule in every trainer: a run no longer than its warm-up trains, with a warning that
    says it never leaves the warm-up rate (useful for smoke tests, a surprise otherwise)."""
    warmup = recipe.scheduler.get('warmup_epochs', 0)
    if warmup and recipe.epochs <= warmup:
        log(f'warning: {recipe.name("epochs")} {recipe.epochs} <= {recipe.name("warmup_epochs")} {warmup}: the whole '
            f'run stays in the linear warm-up from {recipe.scheduler.get("warmup_lr")} and never trains at the '
            f'configured learning rate; lower {recipe.name("warmup_epochs")} for a short run')


def save(model, optimizer, scheduler, scaler, epoch, best, improved, recipe, log):
    """Rank 0, after an epoch: the latest checkpoint (every save_every epochs and the last one),
    model_best.pth when top-1 improved (also between saving epochs), model_<epoch>.pth if asked."""
    layout = recipe.checkpoints
    if not layout.folder:
        return
    weights = model.state_dict()
    state = {layout.model_key: weights, 'optimizer': optimizer.state_dict(), 'lr_scheduler': scheduler.state_dict(),
             'scaler': scaler.state_dict(), 'epoch': epoch + layout.stores_next_epoch, layout.best_key: best,
             **layout.extra}
    if epoch % layout.save_every == 0 or epoch == recipe.epochs - 1:
        path = os.path.join(layout.folder, layout.latest)
        checkpoint.save_atomic(state, path)
        log(f'{path} saved')
    if improved:
        path = os.path.join(layout.folder, 'model_best.pth')
        checkpoint.save_atomic(weights if layout.best_bare else state, path)
        log(f'{path} saved (top-1 {best:.2f}%)')
    if layout.each_epoch:
        checkpoint.save_atomic(weights, os.path.join(layout.folder, f'model_{epoch}.pth'))


@torch.no_grad()
def throughput(session, model, recipe, warmup=50, timed=30):
    """Images per second of the forward pass on one validation batch (Swin's --throughput)."""
    model.to(session.runtime.device).eval()
    images = next(iter(eval_loader(session, recipe)))[0].to(session.runtime.device)
    for _ in range(warmup):
        model(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.time()
    for _ in range(timed):
        model(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    speed = timed * len(images) / (time.time() - start)
    session.log(f'batch_size {len(images)} throughput {speed}')
    return report({'batch_size': len(images), 'images_per_second': speed})


class JsonLines:
    """An epoch log of JSON lines: {train_<k>, test_<k>, epoch, **constant} (PVT/DeiT's log.txt)."""

    def __init__(self, path, **constant):
        self.path, self.constant = path, constant

    def __call__(self, epoch, train_stats, test_stats):
        record = {**{f'train_{k}': v for k, v in train_stats.items()},
                  **{f'test_{k}': v for k, v in (test_stats or {}).items()
                     if k not in ('images', 'protocol', 'seconds')},
                  'epoch': epoch, **self.constant}
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')


class TensorBoard:
    """Epoch scalars for tensorboard: {tag: (stats part 'train' or 'test', key)}. The writer opens at the first
    epoch's end, so a run that stops before (a user error, nothing left to train) leaves no writer open: on
    Python 3.12 an open one prints a traceback at exit (tensorboardX's cleanup cannot start its thread then)."""

    def __init__(self, folder, tags):
        self.folder, self.tags, self.writer = folder, tags, None

    def __call__(self, epoch, train_stats, test_stats):
        if self.writer is None:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(logdir=self.folder)
        parts = {'train': train_stats, 'test': test_stats}
        for tag, (part, key) in self.tags.items():
            if parts[part] is not None:
                self.writer.add_scalar(tag, parts[part][key], epoch)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def decay_groups(model, exempt):
    """The model's trainable parameters as [{'params': decayed}, {'params': the rest, 'weight_decay': 0}];
    exempt(module, full_name, name, param) picks the parameters without weight decay."""
    decayed, exempted = [], []
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                full_name = f'{module_name}.{name}' if module_name else name
                (exempted if exempt(module, full_name, name, param) else decayed).append(param)
    return [{'params': decayed}, {'params': exempted, 'weight_decay': 0.}]
