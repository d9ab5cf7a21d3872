"""torch.compile: ISTA2 compiles as one graph (fullgraph=True) in every evaluation mode, once for all batch sizes
(dynamic=True), and in a train step, giving the eager results; so do whole models (our three backbones, registered
timm models), their batch size marked dynamic. Under compile ISTA2 runs its torch code path (the fused CPU and
Triton kernels are opaque to the compiler)."""
import pytest
import timm
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import common.timm_ista2  # noqa: F401  (registers <name>_ista2)
from common.backbones import BACKBONES
from common.ista2 import ISTA2, rebuild_banks

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


def whole_model(backbone, eval_align):
    """Our backbone's CIFAR-10 ISTA2 model (32 px images, 10 classes) in eval mode, without dropout or drop path,
    aligning by `eval_align`: 'bank' builds its bank config and fills the banks from 8 images."""
    torch.manual_seed(0)
    configs = next(iter(BACKBONES[backbone].cifar.values()))
    model = BACKBONES[backbone].build(configs.bank if eval_align == 'bank' else configs.ista2, 10)
    for m in model.modules():
        if isinstance(m, ISTA2):
            assert m.eval_align == 'bank' if eval_align == 'bank' else m.eval_align != 'bank'
            m.eval_align = eval_align
        elif isinstance(m, torch.nn.Dropout):
            m.p = 0.
        elif hasattr(m, 'drop_prob'):  # timm's DropPath
            m.drop_prob = 0.
    if eval_align == 'bank':
        rebuild_banks(model, [torch.randn(8, 3, 32, 32)])
    return model.eval()


def batch_of(images, generator):
    """(images, 3, 32, 32), its batch size marked dynamic: one graph for every batch size."""
    x = torch.randn(images, 3, 32, 32, generator=generator)
    torch._dynamo.mark_dynamic(x, 0)
    return x


@pytest.mark.parametrize('backbone, eval_align', [(backbone, 'batch') for backbone in BACKBONES] +
                         [('pvt', 'bank'), ('pvt', 'off')])
def test_whole_models_compile_as_one_graph_for_every_batch_size(backbone, eval_align):
    """Dynamo's capture (the 'eager' backend: no code generation) of a whole model in evaluation."""
    model = whole_model(backbone, eval_align)
    counter = CompileCounterWithBackend('eager')
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for images in (2, 3, 5):
            x = batch_of(images, g)
            assert torch.allclose(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224_ista2', 'pvt_v2_b0_ista2'])
def test_registered_timm_models_compile_as_one_graph(name):
    torch.manual_seed(0)
    size = {} if name.startswith('pvt_v2') else {'img_size': 32}  # pvt_v2 takes any image size
    model = timm.create_model(name, num_classes=10, **size).eval()
    counter = CompileCounterWithBackend('eager')
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for images in (2, 3):
            x = batch_of(images, g)
            assert torch.allclose(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


def test_a_compiled_whole_model_train_step_gives_the_eager_gradients():
    """PVTv2-B0 with ISTA2 (CIFAR-10 config) through AOT autograd, which traces forward and backward."""
    eager, twin = whole_model('pvt', 'batch').train(), whole_model('pvt', 'batch').train()
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(twin, fullgraph=True, backend=counter)
    g = torch.Generator().manual_seed(0)
    for images in (4, 3):
        x = batch_of(images, g)
        results = []
        for model, params in ((eager, eager), (compiled, twin)):
            out = model(x)
            results.append((out, *torch.autograd.grad(out.square().sum(), list(params.parameters()))))
        assert all(torch.allclose(c, e, atol=1e-4, rtol=1e-4) for e, c in zip(*results, strict=True))
    assert counter.frame_count == 1
