"""One training epoch and one evaluation pass, shared by the three trainers."""
import datetime
import math
import time
from collections import defaultdict

import torch
from timm.utils import accuracy

from common.errors import UserError
from common.runtime import all_reduce_sum


class NonFiniteError(UserError, RuntimeError):
    """Training diverged; raised before a checkpoint could capture it."""


ADVICE = ('stopping before anything is saved, so the last checkpoint stays the last good one; lower the learning '
          'rate, clip gradients, or look for a broken image, then resume')


class Meters:
    """Running averages of named scalars plus a console line with ETA every `print_freq` steps."""

    def __init__(self, header, total, print_freq, echo):
        self.header, self.total, self.print_freq, self.echo = header, total, print_freq, echo
        self.sums, self.counts, self.last = defaultdict(float), defaultdict(int), {}
        self.start = time.time()

    def update(self, n=1, **values):
        for k, v in values.items():
            self.last[k] = v
            self.sums[k] += v * n
            self.counts[k] += n

    def avg(self, k):
        return self.sums[k] / max(self.counts[k], 1)

    def step(self, i):
        if i % self.print_freq and i != self.total - 1:
            return
        elapsed = time.time() - self.start
        eta = datetime.timedelta(seconds=int(elapsed / (i + 1) * (self.total - i - 1)))
        stats = '  '.join(f'{k}: {self.last[k]:.4g} ({self.avg(k):.4g})' for k in self.last)
        memory = f'  max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}MB' if torch.cuda.is_available() else ''
        self.echo(f'{self.header} [{i}/{self.total}]  eta: {eta}  {stats}{memory}')


def autocast(device, enabled):
    """fp16 autocast on CUDA when enabled; a no-op on CPU (bf16 autocast is slower than fp32 on most CPUs)."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=enabled and device.type == 'cuda')


def train_one_epoch(model, criterion, loader, optimizer, scaler, device, epoch, *, amp=True, clip_grad=None,
                    mixup_fn=None, accumulation_steps=1, step_update=None, print_freq=10, echo=print):
    """Train for one pass over `loader`; returns the averaged stats {'lr', 'loss', ...}.

    step_update(steps) is called after every optimizer step with the number of steps taken before
    it since training began (per-step schedulers, as Swin's);
    gradients are clipped to `clip_grad` (max norm) when given. A non-finite loss raises
    NonFiniteError before any parameter is touched by it, and so do non-finite parameters at
    the end of the epoch, before the caller can save them.
    """
    model.train()
    meters = Meters(f'Epoch: [{epoch}]', len(loader), print_freq, echo)
    optimizer.zero_grad(set_to_none=True)
    steps_done = epoch * (len(loader) // accumulation_steps)
    for i, (images, targets) in enumerate(loader):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with autocast(device, amp):
            loss = criterion(model(images), targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteError(f'loss is {loss_value} at epoch {epoch}, step {i}; {ADVICE}')
        scaler.scale(loss / accumulation_steps).backward()
        if (i + 1) % accumulation_steps == 0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad if clip_grad else float('inf'))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if step_update is not None:
                step_update(steps_done)
            steps_done += 1
            meters.update(grad_norm=float(grad_norm))
        meters.update(n=len(images), loss=loss_value, lr=optimizer.param_groups[-1]['lr'])
        meters.step(i)
    broken = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if broken:
        raise NonFiniteError(f'{len(broken)} parameter tensors are not finite after epoch {epoch} '
                             f'(first: {broken[0]}); {ADVICE}')
    totals = all_reduce_sum([meters.sums['loss'], meters.counts['loss']], device)
    return {'lr': meters.last.get('lr', 0.), 'loss': totals[0] / max(totals[1], 1)}


@torch.no_grad()
def evaluate(model, loader, device, amp=True, sharded=True, print_freq=10, echo=print):
    """Top-1/top-5 accuracy (%) and cross-entropy over the evaluation set.

    sharded: each rank's loader holds a part of the set (results are summed over ranks);
    otherwise every rank holds all of it.
    """
    model.eval()
    meters = Meters('Test:', len(loader), print_freq, echo)
    sums = [0., 0., 0., 0.]  # loss, top-1 hits, top-5 hits, images
    for i, (images, targets) in enumerate(loader):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float().reshape(len(images), -1)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        acc1, acc5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
        n = len(images)
        # hits are whole images: counted exactly, so that equal predictions give equal accuracies to the last bit
        for j, value in enumerate((loss.item() * n, round(acc1.item() * n / 100), round(acc5.item() * n / 100), n)):
            sums[j] += value
        meters.update(n=n, loss=loss.item(), acc1=acc1.item(), acc5=acc5.item())
        meters.step(i)
    loss, hits1, hits5, n = all_reduce_sum(sums, device) if sharded else sums
    images, n = int(n), max(n, 1)
    return {'loss': loss / n, 'acc1': 100 * hits1 / n, 'acc5': 100 * hits5 / n, 'images': images}
