"""One training epoch and one evaluation pass, shared by the three trainers."""
import datetime
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
    """Running averages of named scalars plus a console line with ETA every `print_freq` steps and at the last.

    A value is a float or a 0-dim tensor; tensors are summed on their device and reach the host only when
    they are read (at a console line), all in one transfer, so that updating never waits for the device.
    """

    def __init__(self, header, total, print_freq, echo):
        self.header, self.total, self.print_freq, self.echo = header, total, print_freq, echo
        self.sums, self.counts, self.last = {}, defaultdict(int), {}
        self.start = time.time()

    def update(self, n=1, **values):
        for k, v in values.items():
            self.last[k] = v
            self.sums[k] = self.sums.get(k, 0.) + v * n
            self.counts[k] += n

    def read(self):
        """{name: (last value, sum)} as floats."""
        pairs = {k: (self.last[k], self.sums[k]) for k in self.last}
        tensors = [v for pair in pairs.values() for v in pair if torch.is_tensor(v)]
        fetched = iter(torch.stack(tensors).tolist() if tensors else ())
        return {k: tuple(next(fetched) if torch.is_tensor(v) else v for v in pair) for k, pair in pairs.items()}

    def step(self, i):
        """Print the console line after step i if it is a print_freq-th or the last; returns whether it was."""
        if i % self.print_freq and i != self.total - 1:
            return False
        values = self.read()
        elapsed = time.time() - self.start
        eta = datetime.timedelta(seconds=int(elapsed / (i + 1) * (self.total - i - 1)))
        stats = '  '.join(f'{k}: {last:.4g} ({total / self.counts[k]:.4g})' for k, (last, total) in values.items())
        memory = f'  max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}MB' if torch.cuda.is_available() else ''
        self.echo(f'{self.header} [{i}/{self.total}]  eta: {eta}  {stats}{memory}')
        return True


class FirstNonFiniteLoss:
    """The first step whose loss was not finite, and that loss, followed on the device (no host sync per step)."""

    def __init__(self, device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)  # -1: every loss so far was finite
        self.loss = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, i, loss):
        """loss: 0-dim float64 tensor of step i."""
        keep = torch.isfinite(loss) | (self.step >= 0)
        self.step = torch.where(keep, self.step, i)
        self.loss = torch.where(keep, self.loss, loss)

    def check(self, epoch):
        """Raise NonFiniteError if a loss so far was not finite (one host sync)."""
        step, loss = torch.stack([self.step.double(), self.loss]).tolist()
        if step >= 0:
            raise NonFiniteError(f'loss is {loss} at epoch {epoch}, step {int(step)}; {ADVICE}')


def check_parameters(model, epoch):
    """Raise NonFiniteError if a parameter tensor holds a non-finite value (one host sync)."""
    names, params = zip(*model.named_parameters(), strict=True)
    finite = torch.stack([torch.isfinite(p).all() for p in params]).tolist()
    broken = [name for name, ok in zip(names, finite, strict=True) if not ok]
    if broken:
        raise NonFiniteError(f'{len(broken)} parameter tensors are not finite after epoch {epoch} '
                             f'(first: {broken[0]}); {ADVICE}')


def autocast(device, enabled):
    """fp16 autocast on CUDA when enabled; a no-op on CPU (bf16 autocast is slower than fp32 on most CPUs)."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=enabled and device.type == 'cuda')


def train_one_epoch(model, criterion, loader, optimizer, scaler, device, epoch, *, amp=True, clip_grad=None,
                    mixup_fn=None, accumulation_steps=1, step_update=None, print_freq=10, echo=print):
    """Train for one pass over `loader`; returns {'lr': the last learning rate, 'loss': the mean loss per image
    over all ranks}.

    step_update(steps) is called after every optimizer step with the number of steps taken before
    it since training began (per-step schedulers, as Swin's). With `clip_grad` (a max norm) the
    gradients are clipped and their norm before clipping is shown; without, no norm is computed.

    A step waits for the device only at console lines (every `print_freq` steps and the last; with AMP
    on CUDA the grad scaler also reads its inf check at every optimizer step): the losses, their sum and
    the first non-finite one stay on the device until then. So a non-finite loss raises NonFiniteError,
    naming its epoch and step, at the first console line from its step on rather than before its own
    update: with AMP the grad scaler skips that update; without, the parameters may turn non-finite, but
    the error still comes before this function returns, so before the caller evaluates or saves them.
    Non-finite parameters at the end of the epoch raise it too.
    """
    model.train()
    meters = Meters(f'Epoch: [{epoch}]', len(loader), print_freq, echo)
    first_non_finite = FirstNonFiniteLoss(device)
    optimizer.zero_grad(set_to_none=True)
    steps_done = epoch * (len(loader) // accumulation_steps)
    for i, (images, targets) in enumerate(loader):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with autocast(device, amp):
            loss = criterion(model(images), targets)
        step_loss = loss.detach().double()
        first_non_finite.update(i, step_loss)
        scaler.scale(loss / accumulation_steps).backward()
        if (i + 1) % accumulation_steps == 0:
            if clip_grad:
                scaler.unscale_(optimizer)
                meters.update(grad_norm=torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if step_update is not None:
                step_update(steps_done)
            steps_done += 1
        meters.update(n=len(images), loss=step_loss, lr=optimizer.param_groups[-1]['lr'])
        if meters.step(i):  # the last step's line included
            first_non_finite.check(epoch)
    check_parameters(model, epoch)
    loss_sum = meters.read().get('loss', (0., 0.))[1]
    totals = all_reduce_sum([loss_sum, meters.counts['loss']], device)
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
