"""TorchScript: torch.jit.trace of our backbones with and without ISTA2 and of a patched timm model gives the
eager outputs (at the batch size it was traced with: ISTA2's image count is read from the input's shape)."""
import pytest
import torch

from tests.test_fx import OURS, build


@pytest.mark.parametrize('name', list(OURS) + ['deit_tiny_patch16_224'])
def test_traced_model_gives_the_eager_outputs(name):
    model = build(name)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        assert torch.allclose(traced(x), model(x), atol=1e-5, rtol=1e-5)
