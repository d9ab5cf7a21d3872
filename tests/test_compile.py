"""torch.compile: ISTA2 compiles as one graph (fullgraph=True) in every evaluation mode, once for all batch sizes
(dynamic=True), and in a train step, giving the eager results. Under compile it runs its torch code path (the
fused CPU and Triton kernels are opaque to the compiler)."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from common.ista2 import ISTA2

PUBLISHED = dict(qk_norm=True, v_norm=True, ista2_method='v', rep_tkn_type='mean')


def layer(eval_align, topk=1):
    torch.manual_seed(0)
    m = ISTA2(32, 2, qk_scale=0.25, v_scale=0.25, attn_inter_topk=topk, eval_align=eval_align, bank_size=8,
              **PUBLISHED)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
    return m


def qkv(images, generator):
    return [torch.randn(images, 49, 32, generator=generator) for _ in range(3)]


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize('eval_align', ['batch', 'bank', 'off'])
def test_evaluation_compiles_once_for_every_batch_size(eval_align):
    m = layer(eval_align)
    with torch.no_grad():
        m(*qkv(4, torch.Generator().manual_seed(1)))  # a training batch: fills the bank of 'bank'
    m.eval()
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend=counter)
    g = torch.Generator().manual_seed(0)
    compiled_after = []
    for images in (4, 3, 6):
        q, k, v = qkv(images, g)
        with torch.no_grad():
            assert torch.allclose(compiled(q, k, v), m(q, k, v), atol=1e-5, rtol=1e-5)
        compiled_after.append(counter.frame_count)
    assert compiled_after[0] >= 1 and compiled_after == compiled_after[:1] * 3  # nothing compiled after the first


@pytest.mark.parametrize('topk', [1, 3])
def test_a_compiled_train_step_gives_the_eager_gradients(topk):
    eager, compiled_layer = layer('batch', topk).train(), layer('batch', topk).train()
    compiled = torch.compile(compiled_layer, fullgraph=True, dynamic=True)  # inductor, torch's default
    g = torch.Generator().manual_seed(0)
    for images in (4, 5):
        q, k, v = qkv(images, g)
        results = []
        for model in (eager, compiled):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = model(*leaves)
            params = list(eager.parameters() if model is eager else compiled_layer.parameters())
            results.append((out, *torch.autograd.grad(out.square().sum(), leaves + params)))
        assert all(torch.allclose(c, e, atol=1e-4, rtol=1e-4) for e, c in zip(*results, strict=True))
