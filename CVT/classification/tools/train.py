"""CvT (+ ISTA2) training, launched by run.sh:

    bash run.sh -g N -t train -p 13000 --cfg experiments/imagenet/cvt_ista2/cvt-13-ista2-224x224.yaml \
        DATASET.ROOT /path/to/imagenet [OUTPUT_DIR D TRAIN.BATCH_SIZE_PER_GPU B]

Rerunning the same command continues from OUTPUT_DIR/<dataset>/<cfg name>/checkpoint.pth.
"""
import os
import shutil
import sys
import time
from argparse import Namespace

import torch
from tensorboardX import SummaryWriter
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import checkpoint, data, engine  # noqa: E402
from common.runtime import shutdown  # noqa: E402

from lib import runner  # noqa: E402
from lib.models import (
    build_model,  # noqa: E402
    cls_cvt,  # noqa: E402
)

NORMS = {'bn': (torch.nn.BatchNorm2d,), 'gn': (torch.nn.GroupNorm,), 'ln': (torch.nn.LayerNorm,)}


def param_groups(model, config):
    """[with weight decay, without]: as upstream, WITHOUT_WD_LIST names 'bn', 'gn', 'ln' (those
    norms' parameters), 'bias' and 'dw' (depth-wise conv weights); the model's no_weight_decay()
    names match as substrings. ISTA2's RMSNorm weights are decayed, as in the reference."""
    skip_words = set(config.TRAIN.WITHOUT_WD_LIST)
    skip_names = model.no_weight_decay()
    decay, no_decay = [], []
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f'{module_name}.{name}' if module_name else name
            skipped = (any(isinstance(module, NORMS[w]) for w in skip_words & NORMS.keys())
                       or ('bias' in skip_words and name == 'bias')
                       or ('dw' in skip_words and isinstance(module, torch.nn.Conv2d) and module.groups > 1)
                       or any(s in full for s in skip_names))
            (no_decay if skipped else decay).append(param)
    return [{'params': decay}, {'params': no_decay, 'weight_decay': 0.}]


def build_optimizer(config, model):
    name, lr, wd = config.TRAIN.OPTIMIZER, config.TRAIN.LR, config.TRAIN.WD
    if name == 'timm':
        return create_optimizer_v2(model, **{k.lower(): v for k, v in config.TRAIN.OPTIMIZER_ARGS.items()})
    groups = param_groups(model, config)
    if name == 'adamW':
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    if name == 'adam':
        return torch.optim.Adam(groups, lr=lr, weight_decay=wd)
    if name == 'sgd':
        return torch.optim.SGD(groups, lr=lr, momentum=config.TRAIN.MOMENTUM, weight_decay=wd,
                               nesterov=config.TRAIN.NESTEROV)
    raise ValueError(f'TRAIN.OPTIMIZER {name!r} is not supported; valid: adamW, adam, sgd, timm')


def build_scheduler(config, optimizer):
    """timm's scheduler from TRAIN.LR_SCHEDULER.ARGS, stepped once per epoch as upstream."""
    method = config.TRAIN.LR_SCHEDULER.get('METHOD')
    if method != 'timm':
        raise ValueError(f'TRAIN.LR_SCHEDULER.METHOD {method!r} is not supported; valid: timm')
    scheduler, _ = create_scheduler(Namespace(**config.TRAIN.LR_SCHEDULER.ARGS), optimizer)
    return scheduler


def main():
    args = runner.parse_args('Train a CvT classification network')
    runtime, config, out, logger = runner.setup(args, 'train')
    if config.SWA.ENABLED:
        raise ValueError('SWA.ENABLED: stochastic weight averaging is not supported')
    device = runtime.device
    if runtime.is_main:
        with open(os.path.join(out, 'config.yaml'), 'w') as f:
            f.write(config.dump())
        shutil.copy2(cls_cvt.__file__, out)  # as upstream: the model's source beside its results

    train_set, val_set = runner.datasets(config)
    config.defrost()
    config.MODEL.NUM_CLASSES = len(train_set.classes)
    config.freeze()
    train_loader, train_sampler = runner.train_loader(config, runtime, train_set)
    val_loader = runner.val_loader(config, runtime, val_set)

    model = build_model(config)
    logger.info(str(model))
    logger.info(f'Trainable Model Total Parameter: \t{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M')
    if config.MODEL.INIT_WEIGHTS and config.MODEL.PRETRAINED:
        state = checkpoint.model_state(checkpoint.load(config.MODEL.PRETRAINED))
        layers = config.MODEL.PRETRAINED_LAYERS
        state = {k: v for k, v in state.items() if layers[0] == '*' or k.split('.')[0] in layers}
        missing = checkpoint.load_weights(model, state, strict=False, source=config.MODEL.PRETRAINED)
        logger.info(f'=> initialised from {config.MODEL.PRETRAINED}; not in it: {missing}')
    model.to(device)
    model_without_ddp = model
    if runtime.distributed:
        model = DistributedDataParallel(model, device_ids=[runtime.local_rank] if device.type == 'cuda' else None,
                                        find_unused_parameters=True)
    optimizer = build_optimizer(config, model_without_ddp)
    lr_scheduler = build_scheduler(config, optimizer)
    amp = config.AMP.ENABLED and device.type == 'cuda'
    scaler = torch.amp.GradScaler('cuda', enabled=amp)
    aug = config.AUG
    mixup_fn = None
    if aug.MIXUP_PROB > 0:
        mixup_fn = Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.MIXCUT, cutmix_minmax=aug.MIXCUT_MINMAX or None,
                         prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                         label_smoothing=config.LOSS.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)
        criterion = SoftTargetCrossEntropy()
    elif config.LOSS.LABEL_SMOOTHING > 0:
        criterion = LabelSmoothingCrossEntropy(config.LOSS.LABEL_SMOOTHING)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    begin_epoch, best_perf = config.TRAIN.BEGIN_EPOCH, 0.0
    resume = config.TRAIN.CHECKPOINT or os.path.join(out, 'checkpoint.pth')
    if config.TRAIN.AUTO_RESUME and os.path.isfile(resume):
        ckpt = checkpoint.load(resume)
        checkpoint.load_weights(model_without_ddp, checkpoint.model_state(ckpt, keys=('state_dict',)), source=resume,
                                allowed_missing=('bg_token',))
        optimizer.load_state_dict(ckpt['optimizer'])
        begin_epoch, best_perf = ckpt['epoch'], ckpt['perf']
        if 'lr_scheduler' in ckpt:
            lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
        if ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        logger.info(f'=> resuming from {resume} at epoch {begin_epoch}')
    lr_scheduler.step(begin_epoch)
    torch.autograd.set_detect_anomaly(config.TRAIN.DETECT_ANOMALY)
    writer = SummaryWriter(logdir=out) if runtime.is_main else None

    logger.info('=> start training')
    for epoch in range(begin_epoch, config.TRAIN.END_EPOCH):
        start = time.time()
        data.start_epoch(train_sampler, epoch, config.SEED, runtime.rank)
        train_stats = engine.train_one_epoch(
            model, criterion, train_loader, optimizer, scaler, device, epoch, amp=amp,
            clip_grad=config.TRAIN.CLIP_GRAD_NORM or None, mixup_fn=mixup_fn, print_freq=config.PRINT_FREQ,
            echo=logger.info)
        logger.info(f'=> {epoch} train end, duration: {time.time() - start:.2f}s')
        best_model = False
        if epoch >= config.TRAIN.EVAL_BEGIN_EPOCH:
            stats = engine.evaluate(model, val_loader, device, amp=False, sharded=runtime.distributed,
                                    print_freq=config.PRINT_FREQ, echo=logger.info)
            runner.log_test(logger, stats)
            best_model = stats['acc1'] > best_perf
            best_perf = max(best_perf, stats['acc1'])
            if writer:
                for key, value in (('valid_loss', stats['loss']), ('valid_top1', stats['acc1'])):
                    writer.add_scalar(key, value, epoch)
        lr_scheduler.step(epoch + 1)
        logger.info(f"=> lr: {optimizer.param_groups[0]['lr']}")
        if writer:
            writer.add_scalar('train_loss', train_stats['loss'], epoch)
            writer.flush()
        if runtime.is_main:
            state = model_without_ddp.state_dict()
            checkpoint.save_atomic({'epoch': epoch + 1, 'model': config.MODEL.NAME, 'state_dict': state,
                                    'perf': best_perf, 'optimizer': optimizer.state_dict(),
                                    'lr_scheduler': lr_scheduler.state_dict(), 'scaler': scaler.state_dict()},
                                   os.path.join(out, 'checkpoint.pth'))
            if best_model:
                checkpoint.save_atomic(state, os.path.join(out, 'model_best.pth'))
            if config.TRAIN.SAVE_ALL_MODELS:
                checkpoint.save_atomic(state, os.path.join(out, f'model_{epoch}.pth'))
        logger.info(f'=> epoch {epoch} done in {time.time() - start:.1f}s')
    if runtime.is_main:
        checkpoint.save_atomic(model_without_ddp.state_dict(), os.path.join(out, 'final_state.pth'))
        writer.close()
    logger.info('=> finish training')
    shutdown()


if __name__ == '__main__':
    main()
