"""The ISTA2 option schema: one definition reaches the module and all three backbones' config systems."""
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from common.ista2 import ISTA2
from common.ista2_options import OPTIONS, Option, stage_options

ROOT = Path(__file__).resolve().parents[1]
for folder in ('PVT/classification', 'SWIN/classification', 'CVT/classification'):
    sys.path.insert(0, str(ROOT / folder))
import config as swin_config  # noqa: E402
from lib.config import default as cvt_config  # noqa: E402
from lib.config import update_config  # noqa: E402
from lib.models import build_model as build_cvt  # noqa: E402
from models import build_model as build_swin  # noqa: E402
from pvt_v2 import create_model  # noqa: E402

# MODEL.ISTA2 as the config trees wrote it out before the schema existed, plus the options added since
SWIN_NODE = dict(QK_NORM=False, V_NORM=False, NORM_TYPE='rmsnorm', ISTA2_METHOD=None, ATTN_INTER_TOPK=0,
                 REP_TKN_TYPE=None, REP_TKN_RATIO=None, CLS_TKN_IDX=None, BG_TKN_IDX=None, BS_RATIO=None,
                 ACROSS_GPUS=False, EVAL_ALIGN='batch', BANK_SIZE=256)
CVT_NODE = {key: value for key, value in SWIN_NODE.items() if key not in ('CLS_TKN_IDX', 'BG_TKN_IDX')}
SWIN_YAML = ROOT / 'SWIN' / 'classification' / 'configs' / 'swin_ista2' / 'swin_tiny_ista2_patch4_window7_224.yaml'
SMALL_SWIN = ['DATA.IMG_SIZE', '32', 'MODEL.SWIN.WINDOW_SIZE', '4', 'MODEL.SWIN.EMBED_DIM', '24',
              'MODEL.SWIN.DEPTHS', '[2, 2]', 'MODEL.SWIN.NUM_HEADS', '[2, 4]']
CVT_YAML = ROOT / 'CVT' / 'classification' / 'experiments' / 'imagenet' / 'cvt_ista2' / 'cvt-13-ista2-224x224.yaml'


def ista2_modules(model):
    modules = [m for m in model.modules() if isinstance(m, ISTA2)]
    assert modules
    return modules


@pytest.fixture
def dummy_option(monkeypatch):
    """`dummy_option` (default 0) added to the schema, and the Swin and CvT default trees rebuilt from it."""
    monkeypatch.setitem(OPTIONS, 'dummy_option', Option(0, 'a test option', lambda name, value, earlier: value))
    monkeypatch.setitem(swin_config._C.MODEL, 'ISTA2', swin_config.ista2_defaults())
    monkeypatch.setitem(cvt_config.config.MODEL, 'ISTA2', cvt_config.ista2_defaults())


def test_a_new_option_reaches_every_ista2_module_of_every_backbone(dummy_option):
    pvt = create_model('pvt_v2_b0', ista2_args=dict(dummy_option=3))
    swin = build_swin(swin_config.load_config(SWIN_YAML, [*SMALL_SWIN, 'MODEL.ISTA2.DUMMY_OPTION', '3']))
    cvt_opts = ['MODEL.ISTA2.DUMMY_OPTION', '3']
    cvt = build_cvt(update_config(cvt_config.config.clone(), Namespace(cfg=str(CVT_YAML), opts=cvt_opts)))
    for model in (pvt, swin, cvt):
        assert all(m.dummy_option == 3 for m in ista2_modules(model))
    assert all(m.dummy_option == 0 for m in ista2_modules(create_model('pvt_v2_b0')))


def test_the_derived_yacs_nodes_keep_the_keys_and_defaults():
    assert list(swin_config.ista2_defaults().items()) == list(SWIN_NODE.items())
    assert list(cvt_config.ista2_defaults().items()) == list(CVT_NODE.items())


def test_every_option_is_an_attribute_of_the_module():
    m = ISTA2(6, 2, ista2_method='v', attn_inter_topk=1, rep_tkn_type='cls', cls_tkn_idx=0)
    assert {name: getattr(m, name) for name in OPTIONS} == dict(
        {name: option.default for name, option in OPTIONS.items()},
        ista2_method='v', attn_inter_topk=1, rep_tkn_type='cls', cls_tkn_idx=0)


def test_an_unknown_option_is_refused_naming_it_and_the_valid_ones():
    valid = 'valid: ' + ', '.join(OPTIONS)
    with pytest.raises(TypeError, match=f"unknown option 'qk_nrom' \\(did you mean 'qk_norm'\\?\\); {valid}"):
        ISTA2(6, 2, qk_nrom=True)
    with pytest.raises(TypeError, match=f"unknown option 'topk'.*; {valid}"):
        create_model('pvt_v2_b0', ista2_args=dict(ista2_method='v', topk=1))


def test_per_stage_options_take_one_value_per_stage():
    node = dict(SWIN_NODE, REP_TKN_TYPE='random', REP_TKN_RATIO=[0.5, 1.0])
    stages = stage_options(node, 2, per_stage=('rep_tkn_ratio',))
    assert [s['rep_tkn_ratio'] for s in stages] == [0.5, 1.0] and all(s['rep_tkn_type'] == 'random' for s in stages)
    assert stage_options(SWIN_NODE, 2, per_stage=('rep_tkn_ratio',))[1]['rep_tkn_ratio'] is None
    with pytest.raises(ValueError, match=r'MODEL.ISTA2.REP_TKN_RATIO=0.5: give one value per stage \(2\)'):
        stage_options(dict(node, REP_TKN_RATIO=0.5), 2, per_stage=('rep_tkn_ratio',))
