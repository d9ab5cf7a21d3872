"""benchmarks/measure.py's count of what a forward saves for backward (benchmarks/bench_memory.py's saved MiB), on a
module whose answer is known: each storage once and whole, parameters left out, every storage named by its slots."""
import importlib.util

import torch

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location('measure', ROOT / 'benchmarks' / 'measure.py')
measure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(measure)


class Keep(torch.autograd.Function):
    """Doubles its input; saves it, and two views of a 10-element float64 tensor of its own."""

    @staticmethod
    def forward(ctx, a):
        table = torch.arange(10, dtype=torch.float64)
        ctx.save_for_backward(a, table[2:5], table.view(2, 5))
        return a * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 6)

    def forward(self, x):
        return Keep.apply(torch.relu(self.linear(x)))


def test_each_storage_counts_once_and_whole_and_parameters_not_at_all():
    x = torch.randn(3, 4, requires_grad=True)  # so that the Linear saves its weight too (a parameter)
    saved = measure.saved_for_backward(Tiny(), x)
    by_shape = {s.shape: s for s in saved.values()}
    assert set(by_shape) == {(3, 4), (3, 6), (3,)}  # x, relu's output, the table (first saved as a view of 3)
    assert by_shape[(3, 4)].nbytes == 3 * 4 * 4 and by_shape[(3, 6)].nbytes == 3 * 6 * 4
    assert by_shape[(3,)].nbytes == 10 * 8 and by_shape[(3,)].dtype == torch.float64
    assert 'AddmmBackward0.mat1' in by_shape[(3, 4)].slots
    assert by_shape[(3, 6)].slots == {'ReluBackward0.result', 'KeepBackward.0'}
    assert by_shape[(3,)].slots == {'KeepBackward.1', 'KeepBackward.2'}
