"""common.engine.train_one_epoch on a linear model: host syncs only at console lines, divergence, clipping, the loss."""
import copy
import re

import pytest
import torch

from common import engine

# Tensor methods that make the host wait for the device on CUDA
SYNCS = ('item', 'tolist', '__float__', '__bool__', '__int__', '__index__', 'numpy', 'cpu')


def batches(steps, size=8, last_size=None, seed=0):
    """`steps` batches of (images N x 4, targets N) for 3 classes; the last holds `last_size` images if given."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [size] * (steps - 1) + [last_size or size]
    return [(torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)) for n in sizes]


def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def train(model, loader, lines, criterion=None, epoch=0, lr=0.1, **options):
    """train_one_epoch as the trainers call it on a CPU (plain SGD, a disabled grad scaler); console lines go to
    `lines`."""
    optimizer, scaler = torch.optim.SGD(model.parameters(), lr=lr), torch.amp.GradScaler('cuda', enabled=False)
    return engine.train_one_epoch(model, criterion or torch.nn.CrossEntropyLoss(), loader, optimizer, scaler,
                                  torch.device('cpu'), epoch, amp=False, echo=lines.append, **options)


def counted(name, calls):
    """torch.Tensor's method `name`, appending its name to `calls` at every call."""
    method = getattr(torch.Tensor, name)

    def call(self, *args, **kwargs):
        calls.append(name)
        return method(self, *args, **kwargs)
    return call


def count_syncs(monkeypatch, steps, print_freq, **options):
    """The sync-making tensor calls (in the order made) and the console lines of an epoch of `steps` steps."""
    loader, lines, calls = batches(steps), [], []
    model = linear()
    with monkeypatch.context() as patched:
        for name in SYNCS:
            patched.setattr(torch.Tensor, name, counted(name, calls))
        train(model, loader, lines, print_freq=print_freq, **options)
    return calls, lines


@pytest.mark.parametrize('clip_grad', [None, 1.0])
def test_the_step_syncs_only_at_console_lines(monkeypatch, clip_grad):
    few, few_lines = count_syncs(monkeypatch, 25, 10, clip_grad=clip_grad)
    many, many_lines = count_syncs(monkeypatch, 50, 10, clip_grad=clip_grad)
    assert len(few_lines) == 4 and len(many_lines) == 6  # steps 0, 10, 20, 24 / 0, 10, ..., 40, 49
    assert len(few) <= 2 * len(few_lines) + 4 and len(many) <= 2 * len(many_lines) + 4
    assert len(many) - len(few) <= 2 * (len(many_lines) - len(few_lines))  # a sync per step would add 25
    # with the same console lines, twice the steps make exactly the same syncs
    assert count_syncs(monkeypatch, 25, 100, clip_grad=clip_grad)[0] == \
        count_syncs(monkeypatch, 50, 100, clip_grad=clip_grad)[0]


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_a_non_finite_loss_stops_the_epoch_at_the_next_console_line_naming_its_step(value):
    steps_run = []

    def criterion(logits, targets):
        steps_run.append(len(steps_run))
        loss = torch.nn.functional.cross_entropy(logits, targets)
        return loss + value if steps_run[-1] == 3 else loss

    lines = []
    with pytest.raises(engine.NonFiniteError, match=rf'^loss is {value} at epoch 2, step 3; stopping before anything '
                                                     r'is saved, so the last checkpoint stays the last good one'):
        train(linear(), batches(25), lines, criterion=criterion, epoch=2, print_freq=10)
    assert len(steps_run) == 11  # caught at the console line of step 10, the first after step 3
    assert [line.split('  ')[0] for line in lines] == ['Epoch: [2] [0/25]', 'Epoch: [2] [10/25]']


def test_non_finite_parameters_stop_the_epoch():
    model = linear()
    model.unused = torch.nn.Parameter(torch.tensor([1., float('nan')]))  # no gradient, so the losses stay finite
    with pytest.raises(engine.NonFiniteError, match=r'^1 parameter tensors are not finite after epoch 0 '
                                                     r'\(first: unused\); stopping before anything is saved'):
        train(model, batches(5), [], print_freq=10)


def count_clip_calls(monkeypatch):
    calls = []
    clip = torch.nn.utils.clip_grad_norm_

    def counted(*args, **kwargs):
        calls.append(1)
        return clip(*args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', counted)
    return calls


def test_without_clip_grad_no_norm_is_computed_or_shown(monkeypatch):
    calls, lines = count_clip_calls(monkeypatch), []
    train(linear(), batches(6), lines, print_freq=2)
    assert not calls and lines and not any('grad_norm' in line for line in lines)


def test_clip_grad_clips_at_every_optimizer_step_and_shows_the_norm(monkeypatch):
    calls, lines = count_clip_calls(monkeypatch), []
    train(linear(), batches(6), lines, clip_grad=1.0, accumulation_steps=2, print_freq=2)
    assert len(calls) == 3  # 6 steps, accumulating 2
    assert ['grad_norm: ' in line for line in lines] == [False, True, True, True]  # steps 0 (before the first), 2, 4, 5

    model, loader, clip_grad = linear(), batches(1), 0.01
    images, targets = loader[0]
    start = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(images), targets), list(model.parameters()))
    norm = torch.cat([g.flatten() for g in grads]).norm()
    assert norm > 10 * clip_grad  # so that clipping changes the step
    lines = []
    train(model, loader, lines, lr=1., clip_grad=clip_grad)
    for p, p0, g in zip(model.parameters(), start, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - g * clip_grad / (norm + 1e-6))
    assert f'grad_norm: {norm:.4g} ({norm:.4g})' in lines[0]


def test_the_loss_is_the_mean_over_images_and_the_line_keeps_its_format():
    loader, lines = batches(12, last_size=3), []
    model = linear()
    replica = copy.deepcopy(model)
    stats = train(model, loader, lines, print_freq=5)

    optimizer, losses, sizes = torch.optim.SGD(replica.parameters(), lr=0.1), [], []
    for images, targets in loader:
        loss = torch.nn.functional.cross_entropy(replica(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        sizes.append(len(images))
    mean = sum(loss * n for loss, n in zip(losses, sizes, strict=True)) / sum(sizes)
    assert stats == {'lr': 0.1, 'loss': pytest.approx(mean, rel=1e-6)}
    for p, q in zip(model.parameters(), replica.parameters(), strict=True):
        torch.testing.assert_close(p, q)

    assert [line.split('  ')[0] for line in lines] == ['Epoch: [0] [0/12]', 'Epoch: [0] [5/12]', 'Epoch: [0] [10/12]',
                                                       'Epoch: [0] [11/12]']
    line = re.fullmatch(r'Epoch: \[0\] \[11/12\]  eta: 0:00:00  loss: (\S+) \((\S+)\)  lr: 0\.1 \(0\.1\)', lines[-1])
    assert line and line.groups() == (f'{losses[-1]:.4g}', f'{mean:.4g}')
