"""ONNX: torch.onnx.export (opset 18, the batch axis dynamic) of our three backbones with and without ISTA2, a timm
model of every family patch_timm supports (its registered <name>_ista2) and a patch_timm output gives a valid model
whose onnxruntime outputs at two batch sizes equal eager torch's. ISTA2 models in each evaluation mode: 'bank' and
'off' (an image's output does not depend on its batch: the deployable ones, run at 1 and 3 images) and 'batch' (2 and
3). Each stack runs its torch's default exporter (TorchScript-based up to torch 2.8, torch.export-based from 2.9 on)
and the TorchScript-based one where both exist: that one on every case, the torch.export-based one (seconds per
block) on every model once, in 'batch' (the mode whose graph depends on the batch), and on the other modes with
DeiT. Small models: 32 px (56 px for EVA-02's patches), one or two blocks per stage."""
import copy
import functools
import inspect

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch

import common.timm_ista2  # noqa: F401  (registers <name>_ista2)
from common.backbones import BACKBONES, imported
from common.ista2 import bank_layers, rebuild_banks
from common.timm_ista2 import patch_timm

# the TorchScript-based exporter warns of every Python value its trace fixes: here sizes the model fixes (tokens,
# windows, heads), never the batch size, which the comparisons at two batch sizes check
pytestmark = pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')

_DYNAMO = inspect.signature(torch.onnx.export).parameters.get('dynamo')  # None before torch 2.5
EXPORTERS = ['torchscript'] + (['dynamo'] if _DYNAMO is not None and _DYNAMO.default else [])
OPSET = 18
# our backbones from their CIFAR-10 configs (32 px), one block per stage (Swin: two in the first, for the shift)
OURS = {backbone: next(iter(entry.cifar.values())) for backbone, entry in BACKBONES.items()}
FEWER_BLOCKS = {'swin': ['MODEL.SWIN.DEPTHS', [2, 1, 1, 1]], 'cvt': ['MODEL.SPEC.DEPTH', [1, 1, 1]]}
# one model per family patch_timm supports (as tests/test_fx.py), small: image size, timm keywords
TIMM = {'deit_tiny_patch16_224': (32, dict(img_size=32, patch_size=8, depth=1)),
        'pvt_v2_b0': (32, dict(depths=(1, 1, 1, 1))),
        'swin_tiny_patch4_window7_224': (32, dict(img_size=32, patch_size=2, window_size=4, depths=(2, 1, 1, 1))),
        'eva02_tiny_patch14_224': (56, dict(img_size=56, depth=1)),
        'beit_base_patch16_224': (32, dict(img_size=32, patch_size=8, depth=1)),
        'twins_pcpvt_small': (32, dict(depths=(1, 1, 1, 1))),
        'twins_svt_small': (32, dict(depths=(2, 1, 1, 1)))}  # a local and a global block
BASELINES = [(f'{backbone}:baseline', None) for backbone in OURS]
ISTA2_MODELS = [f'{backbone}:ista2' for backbone in OURS] + list(TIMM) + ['patch_timm']
CASES = {'torchscript': BASELINES + [(name, mode) for name in ISTA2_MODELS for mode in ('bank', 'off', 'batch')],
         'dynamo': BASELINES + [(name, 'batch') for name in ISTA2_MODELS]
         + [('deit_tiny_patch16_224', mode) for mode in ('bank', 'off')]}
PARAMS = [(exporter, name, mode) for exporter in EXPORTERS for name, mode in CASES[exporter]]


def build(name):
    """(model in eval mode, image size): a copy of its model for each test, so that no case sees the eval_align
    another case set (`bank_layers` finds only layers in 'bank')."""
    model, size = _build(name)
    return copy.deepcopy(model), size


@functools.cache
def _build(name):
    """(model in eval mode, image size), once per name; ISTA2 models with eval_align='bank', their banks filled
    with the representatives of noise images (16 rows; 256-row banks of our configs partly)."""
    torch.manual_seed(0)
    if name in TIMM:
        model = timm.create_model(f'{name}_ista2', num_classes=0, eval_align='bank', bank_size=16, **TIMM[name][1])
    elif name == 'patch_timm':  # timm's own per-head q/k norms, the class token as representative
        model = patch_timm(timm.create_model('vit_tiny_patch16_224', num_classes=0, img_size=32, patch_size=8,
                                             depth=1, qk_norm=True),
                           qk_norm=True, v_norm=True, ista2_method='v', attn_inter_topk=1, rep_tkn_type='cls',
                           eval_align='bank', bank_size=16)
    else:
        backbone, which = name.split(':')
        entry = BACKBONES[backbone]
        config = entry.load(entry.path(OURS[backbone].baseline if which == 'baseline' else OURS[backbone].bank))
        if backbone == 'pvt':  # its config names a variant, whose blocks per stage are a keyword of create_model
            model = imported(entry.folder, 'pvt_v2').create_model(config['model'], num_classes=10, depths=(1,) * 4,
                                                                  ista2_args=config['ista2_args'])
        else:
            config.defrost()
            config.merge_from_list(FEWER_BLOCKS[backbone])
            model = entry.model(config, 10)
    size = TIMM[name][0] if name in TIMM else 32
    if bank_layers(model):
        rebuild_banks(model, [torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))] * 2)
    return model.eval(), size


def export(model, images, path, exporter, min_batch):
    """torch.onnx.export as a user calls it, the batch axis dynamic (from min_batch images on)."""
    if exporter == 'dynamo':
        torch.onnx.export(model, (images,), path, opset_version=OPSET, input_names=['images'], dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim('batch', min=min_batch)},))
    else:
        torch.onnx.export(model, (images,), path, opset_version=OPSET, input_names=['images'],
                          dynamic_axes={'images': {0: 'batch'}}, **({'dynamo': False} if _DYNAMO is not None else {}))


@pytest.mark.parametrize('exporter, name, mode', PARAMS, ids=['-'.join(filter(None, p)) for p in PARAMS])
def test_onnxruntime_gives_the_eager_outputs_at_two_batch_sizes(exporter, name, mode, tmp_path):
    model, size = build(name)
    layers = bank_layers(model) if mode else []
    assert bool(layers) == bool(mode), f'{name}: {len(layers)} ISTA2 layers in eval_align bank to set to {mode}'
    for layer in layers:
        layer.eval_align = mode
    batches = (2, 3) if mode == 'batch' else (1, 3)
    generator = torch.Generator().manual_seed(0)
    path = str(tmp_path / 'model.onnx')
    export(model, torch.randn(2, 3, size, size, generator=generator), path, exporter, batches[0])
    onnx.checker.check_model(path)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for images in batches:
        x = torch.randn(images, 3, size, size, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        (found,) = session.run(None, {'images': x.numpy()})
        np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-4)
