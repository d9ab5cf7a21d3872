"""ISTA2 in timm models (common/timm_ista2.py): patch_timm per family, the registered `<name>_ista2` models and
timm's own training path. Small inputs (or small variants built with timm kwargs) keep the whole file fast."""
import copy
import inspect
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.models import vision_transformer
from timm.optim import create_optimizer_v2
from timm.utils import ParseKwargs, accuracy
from torch import nn

from common import timm_ista2
from common.errors import ConfigError
from common.ista2_options import UnknownOptionError
from common.timm_ista2 import PUBLISHED, UnsupportedModelError, patch_timm

ROOT = Path(__file__).resolve().parents[1]
OFF = dict(qk_norm=False, v_norm=False, ista2_method=None, attn_inter_topk=0, rep_tkn_type=None)

# family -> (timm name, kwargs that make it small, input size); every supported attention class appears
FAMILIES = {
    'vit+registers': ('vit_tiny_patch16_224', dict(img_size=64, reg_tokens=2), 64),
    'deit': ('deit_tiny_patch16_224', dict(img_size=64), 64),
    'pvt_v2': ('pvt_v2_b0', dict(), 64),
    'pvt_v2_li': ('pvt_v2_b2_li', dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4]),
                  64),
    'swin': ('swin_tiny_patch4_window7_224', dict(img_size=64, window_size=4), 64),
    'eva02': ('eva02_tiny_patch14_224', dict(img_size=56), 56),
    'beit': ('beit_base_patch16_224', dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                           head_init_scale=1.), 32),
    'twins_pcpvt': ('twins_pcpvt_small', dict(depths=[1, 1, 1, 1]), 64),
    'twins_svt': ('twins_svt_small', dict(depths=[2, 2, 2, 2]), 64),
}
NORM_KEY = re.compile(r'.*\.attn\.ista2\.[qkv]_norm_layer\.weight')


def build(family, **kwargs):
    name, small, size = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, **dict(small, **kwargs)).eval(), size


def set_fused_attn(model, on):
    for module in model.modules():
        if hasattr(module, 'fused_attn'):
            module.fused_attn = on


@pytest.mark.parametrize('family', list(FAMILIES))
def test_alignment_off_computes_what_timm_computes_and_keeps_every_key(family):
    base, size = build(family)
    patched = patch_timm(copy.deepcopy(base), **OFF)
    assert patched.state_dict().keys() == base.state_dict().keys()
    x = torch.randn(3, 3, size, size)
    for fused in (True, False):
        set_fused_attn(base, fused)
        set_fused_attn(patched, fused)
        with torch.no_grad():
            expected = base(x)
            torch.testing.assert_close(patched(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    published = patch_timm(copy.deepcopy(base), **PUBLISHED)
    keys, base_keys = published.state_dict().keys(), base.state_dict().keys()
    assert keys >= base_keys and all(NORM_KEY.fullmatch(k) for k in keys - base_keys)
    assert len(keys - base_keys) == 3 * sum(1 for m in published.modules() if isinstance(m, timm_ista2._Patched))
    missing, unexpected = published.load_state_dict(base.state_dict(), strict=False)  # timm weights load
    assert set(missing) == keys - base_keys and not unexpected
    published.train()
    published(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for n, p in published.named_parameters() if '.ista2.' in n)
    with torch.no_grad():  # alignment mixes the images of a batch
        published.eval()
        assert not torch.allclose(published(x)[:1], published(x[:1]), atol=1e-6)


def randomize_ista2_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if '.ista2.' in name:
                p.uniform_(0.5, 1.5)


def assert_same_as_ours(ours, theirs, filter_fn, x):
    """theirs (patched timm) loads ours' weights through timm's converter, then both compute the same outputs and
    the same gradients for the ISTA2 norms."""
    mapped = filter_fn(ours.state_dict(), theirs)
    theirs.load_state_dict(mapped)  # strict: every key of ours, the ISTA2 norms included, has a home in theirs
    ours.eval(), theirs.eval()  # no drop-path (alignment runs in eval mode too)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_theirs, out_ours, rtol=1e-5, atol=1e-5)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    grads = {k: p.grad for k, p in theirs.named_parameters()}
    ours_grads = filter_fn({k: p.grad for k, p in ours.named_parameters() if '.ista2.' in k}, theirs)
    assert len(ours_grads) == 3 * sum(1 for m in theirs.modules() if isinstance(m, timm_ista2._Patched))
    for key, grad in ours_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-5)


def test_vit_attention_keeps_timm_output_norm_and_gate():
    """timm 1.0.31's ViT attention can normalise (scale_norm) and gate (gated) its output before the projection;
    with alignment off the patched model computes the same (on a timm without them, the plain attention)."""
    base, size = build('deit')
    offered = inspect.signature(vision_transformer.Attention.__init__).parameters
    extra = {name: True for name in ('scale_norm', 'gated') if name in offered}
    for block in base.blocks:
        block.attn = vision_transformer.Attention(192, 3, qkv_bias=True, norm_layer=nn.LayerNorm, **extra).eval()
        with torch.no_grad():
            for name, p in block.attn.named_parameters():
                if name.startswith('norm.'):
                    p.normal_(1. if name.endswith('weight') else 0., 0.5)  # not the identity: the test must see it
    patched = patch_timm(copy.deepcopy(base), **OFF)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = base(x)
        torch.testing.assert_close(patched(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_published_pvt_v2_b0_equals_our_pvt():
    sys.path.insert(0, str(ROOT / 'PVT' / 'classification'))
    from timm.models.pvt_v2 import checkpoint_filter_fn

    from pvt_v2 import create_model
    torch.manual_seed(0)
    ours = create_model('pvt_v2_b0', ista2_args=PUBLISHED)
    randomize_ista2_norms(ours)
    theirs = patch_timm(timm.create_model('pvt_v2_b0'), **PUBLISHED)
    assert_same_as_ours(ours, theirs, checkpoint_filter_fn, torch.randn(3, 3, 64, 64))


def test_published_swin_tiny_equals_our_swin():
    sys.path.insert(0, str(ROOT / 'SWIN' / 'classification'))
    from timm.models.swin_transformer import checkpoint_filter_fn

    from models.swin_transformer import SwinTransformer
    torch.manual_seed(0)
    ours = SwinTransformer(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                           ista2_args=PUBLISHED)
    randomize_ista2_norms(ours)
    theirs = patch_timm(timm.create_model('swin_tiny_patch4_window7_224'), **PUBLISHED)
    assert_same_as_ours(ours, theirs, checkpoint_filter_fn, torch.randn(2, 3, 224, 224))


def tokens_seen_by(model, block_index, x):
    """The input of block `block_index` (B, N, C) during model(x)."""
    seen = []
    handle = model.blocks[block_index].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize('family', ['vit+registers', 'eva02', 'beit'])
def test_class_token_representatives(family):
    base, size = build(family)
    x = torch.randn(3, 3, size, size)
    tokens = tokens_seen_by(base, 1, x).shape[1]
    cls = patch_timm(copy.deepcopy(base), **dict(PUBLISHED, rep_tkn_type='cls'))
    assert {m.ista2.cls_tkn_idx for m in cls.modules() if isinstance(m, timm_ista2._Patched)} == {0}
    assert cls.state_dict().keys() == patch_timm(copy.deepcopy(base), **PUBLISHED).state_dict().keys()

    options = dict(PUBLISHED, rep_tkn_type='cls+bg')
    model = patch_timm(copy.deepcopy(base), **options)
    ista2 = {(m.ista2.bg_tkn_idx, m.ista2.cls_tkn_idx) for m in model.modules() if isinstance(m, timm_ista2._Patched)}
    assert ista2 == {(0, 1)}
    bg = model.state_dict()['blocks.0.bg_token']  # a saved buffer, seeded: the same in every build
    assert bg.shape == (1, 1, base.cls_token.shape[-1]) and 'blocks.0.bg_token' not in dict(model.named_parameters())
    assert torch.equal(bg, patch_timm(copy.deepcopy(base), **options).blocks[0].bg_token)
    inside = tokens_seen_by(model, 1, x)  # between the first and the last block: the background token first
    assert inside.shape[1] == tokens + 1
    with torch.no_grad():
        out = model(x)
    assert out.shape == base(x).shape  # and the head sees the model's own tokens
    with pytest.raises(timm_ista2.UnsupportedModelError, match='background token'):
        model.forward_intermediates(x)  # its blocks' outputs hold one token more than the model expects
    assert len(cls.forward_intermediates(x, indices=1, intermediates_only=True)) == 1
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if '.ista2.' in n)


def test_class_token_types_need_a_class_token():
    base, _ = build('pvt_v2')
    with pytest.raises(ConfigError, match='needs a model with a class token'):
        patch_timm(base, **dict(PUBLISHED, rep_tkn_type='cls'))
    vit, _ = build('deit')
    with pytest.raises(ConfigError, match='token layout'):
        patch_timm(vit, **dict(PUBLISHED, rep_tkn_type='cls', cls_tkn_idx=0))


def test_unsupported_models_name_the_block_and_attention_class():
    convit = timm.create_model('convit_tiny', img_size=32, embed_dim=32, depth=2, local_up_to_layer=1)
    with pytest.raises(UnsupportedModelError, match=r"block 'blocks\.0' \(timm\.models\.convit\.Block\).*GPSA"):
        patch_timm(convit)
    coat = timm.create_model('coat_lite_tiny', embed_dims=[16, 16, 16, 16], serial_depths=[1, 1, 1, 1])
    with pytest.raises(UnsupportedModelError, match=r'SerialBlock.*FactorAttnConvRelPosEnc'):
        patch_timm(coat)
    with pytest.raises(UnsupportedModelError, match='no attention block'):
        patch_timm(timm.create_model('resnet10t'))
    model, _ = build('deit')
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnknownOptionError, match='rep_tkn_typ'):
        patch_timm(model, rep_tkn_typ='mean')  # a bad option changes nothing
    assert model.state_dict().keys() == before.keys() and not any(
        isinstance(m, timm_ista2._Patched) for m in model.modules())
    patch_timm(model)
    with pytest.raises(UnsupportedModelError, match='already patched'):
        patch_timm(model)


def test_adapters_take_every_argument_this_timm_passes(monkeypatch):
    """Each adapter's forward takes every parameter of the timm forward it replaces (timm 1.0.31 added attn_mask
    and is_causal to ViT attention); masking is refused by name; a timm that adds one more is refused at patch
    time instead of at the first forward."""
    for adapter, _ in timm_ista2.ADAPTERS.values():
        timm_ista2._check_signature(adapter)
    model = patch_timm(build('deit')[0], **PUBLISHED)
    attn, tokens = model.blocks[0].attn, torch.randn(2, 17, 192)
    assert attn(tokens, attn_mask=None, is_causal=False).shape == tokens.shape
    with pytest.raises(UnsupportedModelError, match='ViTAttention called with attn_mask'):
        attn(tokens, attn_mask=torch.ones(2, 1, 17, 17, dtype=torch.bool))
    with pytest.raises(UnsupportedModelError, match='is_causal=True'):
        attn(tokens, is_causal=True)

    def forward(self, x, attn_mask=None, is_causal=False, token_dropout=None):
        raise AssertionError('never called')

    monkeypatch.setattr(timm.models.vision_transformer.Attention, 'forward', forward)
    with pytest.raises(UnsupportedModelError, match=r'Attention\.forward take token_dropout'):
        patch_timm(build('deit')[0])


def parse_model_kwargs(*words):
    """--model-kwargs as timm's train.py and validate.py parse it."""
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    return parser.parse_args(['--model-kwargs', *words]).model_kwargs


def test_registered_names_take_options_from_model_kwargs():
    names = timm.list_models('*_ista2')
    assert {f'{n}_ista2' for n in timm_ista2.REGISTERED} <= set(names)
    assert 'deit_tiny_patch16_224_ista2' in names and 'swin_tiny_patch4_window7_224_ista2' in names
    small = ['img_size=32', 'patch_size=8', 'depth=2']
    model = timm.create_model('deit_tiny_patch16_224_ista2', **parse_model_kwargs(*small))
    ista2 = model.blocks[0].attn.ista2
    assert (ista2.qk_norm, ista2.v_norm, ista2.ista2_method, ista2.attn_inter_topk, ista2.rep_tkn_type) == (
        True, True, 'v', 1, 'mean')
    kwargs = parse_model_kwargs(*small, 'rep_tkn_type=cls+bg', 'qk_norm=False')
    model = timm.create_model('deit_tiny_patch16_224_ista2', **kwargs)
    assert model.blocks[0].attn.ista2.rep_tkn_type == 'cls+bg' and not model.blocks[0].attn.ista2.qk_norm
    assert 'blocks.0.bg_token' in model.state_dict()
    off = timm.create_model('deit_tiny_patch16_224_ista2', **parse_model_kwargs(*small, 'ista2_method=none',
                                                                               'rep_tkn_type=none'))
    assert off.blocks[0].attn.ista2.ista2_method is None and off.blocks[0].attn.ista2.attn_inter_topk == 0
    with pytest.raises(ConfigError, match='qk_norm'):
        timm.create_model('deit_tiny_patch16_224_ista2', **parse_model_kwargs(*small, 'qk_norm=yes'))


def test_registered_names_have_their_base_models_pretrained_cfgs():
    """What timm's own model tests read by name (tests/timm_model_tests.py runs them): the cfgs and their tags."""
    assert {f'{n}_ista2' for n in timm_ista2.REGISTERED} <= set(timm.list_models(name_matches_cfg=True))
    for base in timm_ista2.REGISTERED:
        tags = [name.partition('.')[2] for name in timm.list_models(base, include_tags=True)]
        assert [name.partition('.')[2] for name in timm.list_models(f'{base}_ista2', include_tags=True)] == tags
        cfg, base_cfg = timm.get_pretrained_cfg(f'{base}_ista2'), timm.get_pretrained_cfg(base)
        assert cfg.architecture == f'{base}_ista2' and cfg.input_size == base_cfg.input_size
    tagged = timm.create_model('vit_tiny_patch16_224_ista2.augreg_in21k', depth=1)  # the tag's 21843 classes
    assert tagged.num_classes == timm.create_model('vit_tiny_patch16_224.augreg_in21k', depth=1).num_classes > 1000


def test_timm_model_tests_follow_each_base_model_with_its_twin():
    from tests.timm_model_tests import _with_twins
    assert _with_twins(['model_name'], ['pvt_v2_b0.in1k', 'resnet18', 'pvt_v2_b0_ista2']) == [
        'pvt_v2_b0.in1k', 'pvt_v2_b0_ista2.in1k', 'resnet18']
    swin = 'swin_tiny_patch4_window7_224'
    assert _with_twins(['model_name', 'img_size'], [(swin, 224)]) == [(swin, 224), (f'{swin}_ista2', 224)]


def test_timm_training_path_end_to_end(tiny_data, tmp_path):
    """What timm's train.py and validate.py do with `--model deit_tiny_patch16_224_ista2 --model-kwargs ...`,
    step by step through timm's own factories (the scripts themselves are not part of the timm wheel)."""
    torch.manual_seed(0)
    name, model_kwargs = 'deit_tiny_patch16_224_ista2', parse_model_kwargs('img_size=32', 'patch_size=8')
    model = timm.create_model(name, pretrained=False, in_chans=3, num_classes=10, drop_rate=0.,
                              drop_path_rate=0.1, drop_block_rate=None, global_pool=None, bn_momentum=None,
                              bn_eps=None, scriptable=False, checkpoint_path='', **model_kwargs)
    data_config = resolve_data_config({'img_size': 32}, model=model)
    assert data_config['input_size'] == (3, 32, 32)
    train = create_dataset('', root=tiny_data, split='train', is_training=True, batch_size=16)
    loader = create_loader(train, input_size=data_config['input_size'], batch_size=16, is_training=True,
                           use_prefetcher=False, interpolation='random', mean=data_config['mean'],
                           std=data_config['std'], num_workers=0, persistent_workers=False)
    loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)
    optimizer = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05)
    norms_before = model.blocks[0].attn.ista2.v_norm_layer.weight.detach().clone()
    model.train()
    losses = []
    for step, (images, targets) in enumerate(loader):
        loss = loss_fn(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == 2:
            break
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(model.blocks[0].attn.ista2.v_norm_layer.weight, norms_before)  # ISTA2 norms train
    checkpoint = tmp_path / 'last.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'arch': name}, checkpoint)

    # validate.py: the model by name with the same --model-kwargs, the checkpoint, the eval loader
    evaluated = timm.create_model(name, pretrained=False, num_classes=10, in_chans=3, global_pool=None,
                                  scriptable=False, checkpoint_path=str(checkpoint), **model_kwargs).eval()
    val = create_dataset('', root=tiny_data, split='val')
    val_loader = create_loader(val, input_size=(3, 32, 32), batch_size=20, use_prefetcher=False,
                               mean=data_config['mean'], std=data_config['std'], crop_pct=1.0, num_workers=0,
                               persistent_workers=False)
    images, targets = next(iter(val_loader))
    model.eval()
    with torch.no_grad():
        logits = evaluated(images)
        torch.testing.assert_close(logits, model(images))
    top1, = accuracy(logits, targets, topk=(1,))
    assert 0 <= top1.item() <= 100


def test_running_a_script_through_the_module_sees_the_registered_names(tmp_path, monkeypatch):
    """`python -m common.timm_ista2 train.py ARGS` runs the script as __main__ with ARGS after registration; a
    stand-in for train.py builds its --model the way train.py does."""
    script = tmp_path / 'train.py'
    script.write_text(
        'import argparse, json, sys\n'
        'from timm.models import create_model\n'
        'from timm.utils import ParseKwargs\n'
        'parser = argparse.ArgumentParser()\n'
        'parser.add_argument("data_dir")\n'
        'parser.add_argument("--model")\n'
        'parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs)\n'
        'args = parser.parse_args()\n'
        'if __name__ == "__main__":\n'
        '    model = create_model(args.model, num_classes=10, **args.model_kwargs)\n'
        '    keys = [k for k in model.state_dict() if ".ista2." in k]\n'
        '    open(args.data_dir + "/out.json", "w").write(json.dumps([sys.argv[0], len(keys)]))\n')
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    monkeypatch.setattr(sys, 'path', list(sys.path))
    timm_ista2.main([str(script), str(tmp_path), '--model', 'deit_tiny_patch16_224_ista2',
                     '--model-kwargs', 'img_size=32', 'patch_size=8', 'depth=2'])
    import json
    assert json.loads((tmp_path / 'out.json').read_text()) == [str(script), 6]
