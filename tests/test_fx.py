"""torch.fx and feature extraction: our three backbones with and without ISTA2 and a timm model of every family
patch_timm supports trace with ISTA2 as one leaf of the graph, and the traced model gives the eager model's
outputs and gradients (torch.fx with a tracer that keeps ISTA2 whole, torchvision's and timm's feature
extractors)."""
import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import common.timm_ista2  # noqa: F401  (registers <name>_ista2)
from common.backbones import BACKBONES
from common.ista2 import ISTA2

OURS = {f'{backbone}:{config}': (backbone, config) for backbone, entry in BACKBONES.items()
        for config in next(iter(entry.paper.values()))}  # each backbone's first paper row, baseline and ISTA2
TIMM = ['deit_tiny_patch16_224', 'pvt_v2_b0', 'swin_tiny_patch4_window7_224', 'eva02_tiny_patch14_224',
        'beit_base_patch16_224', 'twins_pcpvt_small', 'twins_svt_small']  # one per family patch_timm supports


class KeepISTA2Whole(torch.fx.Tracer):
    """torch.fx's tracer, with ISTA2 a leaf: its data-dependent inner workings stay out of the graph."""

    def is_leaf_module(self, module, name):
        return isinstance(module, ISTA2) or super().is_leaf_module(module, name)


def build(name):
    torch.manual_seed(0)
    if name in OURS:
        backbone, config = OURS[name]
        return BACKBONES[backbone].build(config).eval()
    return timm.create_model(f'{name}_ista2').eval()


def outputs_and_grads(model, x):
    """The logits (or the extracted node's output) and the gradients of their sum, by parameter name."""
    out = model(x)
    out = out if torch.is_tensor(out) else list(out.values())[-1]
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(out.sum(), params, allow_unused=True)
    return out.detach(), {n: g for n, g in zip(names, grads, strict=True) if g is not None}


def assert_same(eager, traced):
    assert torch.allclose(traced[0], eager[0], atol=1e-5, rtol=1e-5)
    assert traced[1].keys() == eager[1].keys()
    assert all(torch.allclose(traced[1][n], g, atol=1e-5, rtol=1e-4) for n, g in eager[1].items())


@pytest.fixture(scope='module', params=list(OURS) + TIMM)
def model_and_images(request):
    """(model in eval mode, 2 images, the eager outputs_and_grads)."""
    model = build(request.param)
    size = model.default_cfg['input_size'][1:] if hasattr(model, 'default_cfg') else (224, 224)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    return model, x, outputs_and_grads(model, x)


def test_traces_with_torch_fx_ista2_one_leaf(model_and_images):
    model, x, eager = model_and_images
    graph = torch.fx.GraphModule(model, KeepISTA2Whole().trace(model))
    layers = {name for name, m in model.named_modules() if isinstance(m, ISTA2)}
    called = {node.target for node in graph.graph.nodes if node.op == 'call_module'}
    assert layers <= called  # every ISTA2 layer is called as one module ...
    assert not any(target.startswith(f'{layer}.') for layer in layers for target in called)  # ... and not opened
    assert_same(eager, outputs_and_grads(graph, x))


def test_torchvision_feature_extractor(model_and_images):
    model, x, eager = model_and_images
    tracer = {'leaf_modules': [ISTA2]}
    nodes = get_graph_node_names(model, tracer_kwargs=tracer)[1]
    extractor = create_feature_extractor(model, [nodes[-1]], tracer_kwargs=tracer)
    assert_same(eager, outputs_and_grads(extractor, x))


def test_timm_feature_extractor_needs_no_leaf_list(model_and_images):
    """ISTA2 is registered with timm's fx helpers (timm.models.register_notrace_module)."""
    model, x, eager = model_and_images
    nodes = get_graph_node_names(model, tracer_kwargs={'leaf_modules': [ISTA2]})[1]
    extractor = timm.models.create_feature_extractor(model, [nodes[-1]])
    assert_same(eager, outputs_and_grads(extractor, x))


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224', 'pvt_v2_b0', 'swin_tiny_patch4_window7_224',
                                  'eva02_tiny_patch14_224', 'twins_pcpvt_small'])
def test_features_only_runs_through_ista2(name):
    """timm's features_only of a registered <name>_ista2: with alignment and norms off it returns timm's own
    features (the same weights: ISTA2 draws no random numbers), with the published options other finite ones."""
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    models = {}
    for key, model_name, options in (('timm', name, {}), ('off', f'{name}_ista2', dict(
            qk_norm=False, v_norm=False, ista2_method='none')), ('ista2', f'{name}_ista2', {})):
        torch.manual_seed(0)
        models[key] = timm.create_model(model_name, features_only=True, out_indices=(1, 2), **options).eval()
    with torch.no_grad():
        features = {key: model(x) for key, model in models.items()}
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(features['off'], features['timm'], strict=True))
    assert [f.shape for f in features['ista2']] == [f.shape for f in features['timm']]
    assert all(torch.isfinite(f).all() and not torch.allclose(f, g, atol=1e-3)
               for f, g in zip(features['ista2'], features['timm'], strict=True))


@pytest.mark.parametrize('name', list(OURS))
def test_our_backbones_hand_each_stage_map_to_a_dense_head(name):
    """forward_stages: one (B, C_i, H_i, W_i) map per stage, at strides 4, 8, 16 (, 32), each with a gradient path
    to the input; PVT's and Swin's logits are the head on the last map's mean."""
    backbone = OURS[name][0]
    model = build(name)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0), requires_grad=True)
    maps = model.forward_stages(x)
    strides = (4, 8, 16) if backbone == 'cvt' else (4, 8, 16, 32)
    assert [tuple(m.shape[::2]) + tuple(m.shape[3:]) for m in maps] == [(2, 224 // s, 224 // s) for s in strides]
    for stage_map in maps:
        (grad,) = torch.autograd.grad(stage_map.mean(), x, retain_graph=True)
        assert grad.abs().sum() > 0
    if backbone != 'cvt':  # CvT-13 classifies from its class token
        with torch.no_grad():
            assert torch.allclose(model.head(maps[-1].mean((2, 3))), model(x), atol=1e-5)
