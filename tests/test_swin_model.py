"""Swin Transformer models: upstream parameter counts and key names, timm equivalence, ISTA2 wiring."""
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models.swin_transformer import checkpoint_filter_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'SWIN' / 'classification'))
from models.swin_transformer import SwinTransformer  # noqa: E402

PUBLISHED = dict(qk_norm=True, v_norm=True, ista2_method='v', attn_inter_topk=1, rep_tkn_type='mean')


def swin_t(**kw):
    return SwinTransformer(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, **kw)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_swin_t_counts_and_keys_equal_upstream():
    model = swin_t()
    keys = model.state_dict()
    assert n_params(model) == 28_288_354 and len(keys) == 190
    assert sum(k.endswith(('relative_position_index', 'attn_mask')) for k in keys) == 17
    assert 'layers.0.blocks.1.attn_mask' in keys and 'layers.3.blocks.1.attn_mask' not in keys
    assert 'layers.2.downsample.reduction.weight' in keys and 'layers.3.downsample.norm.weight' not in keys


@pytest.mark.parametrize('kwargs, params, gflops', [
    (dict(depths=(2, 2, 18, 2)), 49_606_258, 8.747),  # Swin-S
    (dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)), 87_768_224, 15.438),  # Swin-B
    (dict(img_size=384, window_size=12, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
     87_903_584, 47.105),  # Swin-B at 384, window 12
])
def test_swin_s_and_b_counts_and_flops_equal_upstream(kwargs, params, gflops):
    model = SwinTransformer(**kwargs)
    assert n_params(model) == params and len(model.state_dict()) == 364
    assert round(model.flops() / 1e9, 3) == gflops


def test_swin_t_ista2_adds_only_the_norms():
    model = swin_t(ista2_args=PUBLISHED)
    extra = set(model.state_dict()) - set(swin_t().state_dict())
    assert n_params(model) == 28_301_602 and len(model.state_dict()) == 226 and len(extra) == 36
    assert all(re.fullmatch(r'layers\.\d\.blocks\.\d+\.attn\.ista2\.[qkv]_norm_layer\.weight', k) for k in extra)


def test_baseline_equals_timm_given_the_same_weights():
    torch.manual_seed(0)
    ours = swin_t().eval()
    theirs = timm.create_model('swin_tiny_patch4_window7_224').eval()
    theirs.load_state_dict(checkpoint_filter_fn(ours.state_dict(), theirs))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_ista2_aligns_each_image_over_all_its_windows():
    torch.manual_seed(0)
    model = SwinTransformer(img_size=64, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4,
                            num_classes=5, ista2_args=PUBLISHED).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        together, alone = model(x), torch.cat([model(x[i:i + 1]) for i in range(3)])
        assert not torch.allclose(together, alone)  # images influence each other through alignment
        perm = torch.tensor([2, 0, 1])
        assert torch.allclose(model(x[perm]), together[perm], atol=1e-5)  # but only as a set
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if 'ista2' in n)


def test_per_stage_ista2_args_must_match_the_stages():
    with pytest.raises(ValueError, match='one dict per stage'):
        swin_t(ista2_args=[PUBLISHED] * 3)
