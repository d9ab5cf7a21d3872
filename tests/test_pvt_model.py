"""PVTv2 models: upstream parameter counts and key names, timm equivalence, ISTA2 wiring."""
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models.pvt_v2 import checkpoint_filter_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'PVT' / 'classification'))
from common.checkpoint import CheckpointError, load_weights  # noqa: E402

from pvt_v2 import VARIANTS, create_model  # noqa: E402

PUBLISHED = dict(qk_norm=True, v_norm=True, ista2_method='v', attn_inter_topk=1, rep_tkn_type='mean')
UPSTREAM_PARAMS = {'pvt_v2_b0': 3_666_760, 'pvt_v2_b1': 14_009_000, 'pvt_v2_b2': 25_362_856,
                   'pvt_v2_b2_li': 22_553_512, 'pvt_v2_b3': 45_238_696, 'pvt_v2_b4': 62_556_072,
                   'pvt_v2_b5': 81_956_008}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name', list(VARIANTS))
def test_parameter_counts_equal_upstream(name):
    assert n_params(create_model(name)) == UPSTREAM_PARAMS[name]


@pytest.mark.parametrize('name, params, keys', [('pvt_v2_b0', 3_669_832, 202), ('pvt_v2_b2', 25_375_336, 382)])
def test_ista2_configs_add_only_the_norms(name, params, keys):
    base, ista2 = create_model(name), create_model(name, ista2_args=PUBLISHED)
    assert n_params(ista2) == params and len(ista2.state_dict()) == keys
    extra = set(ista2.state_dict()) - set(base.state_dict())
    assert set(base.state_dict()) <= set(ista2.state_dict())
    assert all(re.fullmatch(r'block[1-4]\.\d+\.attn\.ista2\.[qkv]_norm_layer\.weight', k) for k in extra)
    assert len(extra) == 3 * sum(VARIANTS[name]['depths'])


@pytest.mark.parametrize('name', ['pvt_v2_b0', 'pvt_v2_b2_li'])
def test_baseline_equals_timm_given_the_same_weights(name):
    torch.manual_seed(0)
    ours = create_model(name).eval()
    theirs = timm.create_model(name).eval()
    theirs.load_state_dict(checkpoint_filter_fn(ours.state_dict(), theirs))  # strict: every upstream name maps
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_upstream_weights_load_into_ista2_reporting_only_the_new_keys():
    upstream = create_model('pvt_v2_b0').state_dict()
    model = create_model('pvt_v2_b0', ista2_args=PUBLISHED)
    with pytest.raises(CheckpointError, match='24 missing'):
        load_weights(model, upstream)
    missing = load_weights(model, upstream, allowed_missing=('.ista2.',))
    assert sorted(missing) == sorted(set(model.state_dict()) - set(upstream))
    assert torch.equal(model.state_dict()['head.weight'], upstream['head.weight'])


def test_checkpoint_of_another_architecture_is_refused():
    with pytest.raises(CheckpointError, match='another shape'):
        load_weights(create_model('pvt_v2_b0'), create_model('pvt_v2_b1').state_dict())


def test_ista2_model_trains_and_aligns_across_the_batch():
    torch.manual_seed(0)
    model = create_model('pvt_v2_b0', num_classes=10, ista2_args=PUBLISHED)
    x = torch.randn(3, 3, 64, 64)
    out = model(x)
    out.sum().backward()
    assert out.shape == (3, 10)
    assert all(p.grad is not None for n, p in model.named_parameters() if 'ista2' in n)
    model.eval()
    with torch.no_grad():  # image 0's prediction depends on its batch companions, as in the reference
        assert not torch.allclose(model(x)[:1], model(x[:1]))


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match='pvt_v2_b0'):
        create_model('pvt_small')
