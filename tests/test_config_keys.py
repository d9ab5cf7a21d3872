"""Config keys of the Swin and CvT trees: every shipped file loads, and a key nothing reads is refused
unless it keeps its default (or the one value that states what the trainer does anyway)."""
import importlib.util
import re
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from common.yacs_files import unread_leaves

ROOT = Path(__file__).resolve().parents[1]
SWIN, CVT = ROOT / 'SWIN' / 'classification', ROOT / 'CVT' / 'classification'
sys.path.insert(0, str(CVT))
from lib.config import default as cvt  # noqa: E402

_spec = importlib.util.spec_from_file_location('swin_config', SWIN / 'config.py')
swin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(swin)

SWIN_FILES = sorted((SWIN / 'configs').rglob('*.yaml'))
CVT_FILES = sorted((CVT / 'experiments').rglob('*.yaml'))
SWIN_CFG = SWIN / 'configs' / 'swin_ista2' / 'swin_tiny_ista2_patch4_window7_224.yaml'
CVT_CFG = CVT / 'experiments' / 'imagenet' / 'cvt_ista2' / 'cvt-13-ista2-224x224.yaml'


def load_cvt(path, *opts):
    return cvt.update_config(cvt.config.clone(), Namespace(cfg=str(path), opts=list(opts)))


def refusal(key):
    return rf'\n  {re.escape(key)} = .*Nothing here reads it: remove it or set it back to'


def other_value(value):
    """A value of the same type as `value` (as yacs requires) that differs from it, as override text."""
    if isinstance(value, bool):
        return str(not value)
    if isinstance(value, int | float):
        return str(value + 1)
    if isinstance(value, str):
        return repr(value + 'x')
    if isinstance(value, tuple):
        return repr((*value, *value[:1]) if value else (1,))
    if isinstance(value, list):
        return repr([*value, *value[:1]] if value else [1])
    if value is None:
        return '1'
    raise TypeError(value)


def test_every_config_file_is_found():
    assert len(SWIN_FILES) == 5 and len(CVT_FILES) == 5  # paper pair, CIFAR pair, CIFAR bank config


@pytest.mark.parametrize('path', SWIN_FILES, ids=lambda p: str(p.relative_to(SWIN)))
def test_every_swin_config_file_loads(path):
    swin.load_config(str(path))


@pytest.mark.parametrize('path', CVT_FILES, ids=lambda p: str(p.relative_to(CVT)))
def test_every_cvt_config_file_loads(path):
    load_cvt(path)


@pytest.mark.parametrize('key, default', list(unread_leaves(swin._C, swin.UNREAD)), ids=str)
def test_an_unread_swin_key_set_otherwise_is_refused(key, default):
    swin.load_config(str(SWIN_CFG), [key, repr(default)])  # its default: accepted
    with pytest.raises(ValueError, match=refusal(key)):
        swin.load_config(str(SWIN_CFG), [key, other_value(default)])


@pytest.mark.parametrize('key, default', list(unread_leaves(cvt.config, cvt.UNREAD)), ids=str)
def test_an_unread_cvt_key_set_otherwise_is_refused(key, default):
    load_cvt(CVT_CFG, key, repr(default))  # its default: accepted
    with pytest.raises(ValueError, match=refusal(key)):
        load_cvt(CVT_CFG, key, other_value(default))


def test_the_refusal_names_the_key_its_value_upstreams_use_and_the_remedy():
    with pytest.raises(ValueError) as refused:
        load_cvt(CVT_CFG, 'TRAIN.SHUFFLE', 'False', 'AMP.MEMORY_FORMAT', 'nhwc')
    message = str(refused.value)
    assert ('TRAIN.SHUFFLE = False: training data are always shuffled, as upstream, which never read the key. '
            'Nothing here reads it: remove it or set it back to True') in message
    assert "AMP.MEMORY_FORMAT = 'nhwc': upstream: 'nhwc' put the model in channels_last" in message
    assert "set it back to 'nchw'" in message


@pytest.mark.parametrize('key, value', [('TRAIN.SHUFFLE', 'True'), ('DATASET.DATA_FORMAT', 'jpg'), ('GPUS', '(0,)'),
                                        ('DEBUG.DEBUG', 'False'), ('WORKERS', '10')])
def test_cvt_accepts_the_value_that_states_what_happens(key, value):
    load_cvt(CVT_CFG, key, value)


def test_cvt_training_data_are_always_shuffled():
    assert load_cvt(CVT_CFG).TRAIN.SHUFFLE is True
    with pytest.raises(ValueError, match='TRAIN.SHUFFLE = False: training data are always shuffled'):
        load_cvt(CVT_CFG, 'TRAIN.SHUFFLE', 'False')


def test_cvt_a_key_a_file_adds_under_an_unread_open_node_is_refused(tmp_path):
    path = tmp_path / 'cvt.yaml'
    path.write_text(f"BASE: ['{CVT_CFG}']\nFINETUNE:\n  LR_SCHEDULER:\n    DECAY_EPOCHS: 10\n")
    with pytest.raises(ValueError, match=r'FINETUNE.LR_SCHEDULER.DECAY_EPOCHS = 10: .*: remove it$'):
        load_cvt(path)


def test_swin_other_model_types_nodes_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r'MODEL.SWINV2.EMBED_DIM = 128: upstream: the Swin V2 model \(MODEL.TYPE '
                                         r'swinv2\); only MODEL.TYPE swin is built here'):
        swin.load_config(str(SWIN_CFG), ['MODEL.SWINV2.EMBED_DIM', '128'])


def test_every_unread_key_is_in_its_tree_and_not_read_by_name_in_the_trainer():
    """A guard against listing a key the trainer reads: its full name must not occur in the trainer's code."""
    readers = {'swin': [SWIN / 'main.py', SWIN / 'models' / 'build.py'],
               'cvt': [CVT / 'tools' / 'train.py', CVT / 'tools' / 'test.py', CVT / 'lib' / 'runner.py',
                       CVT / 'lib' / 'models' / 'cls_cvt.py']}
    shared = [path for path in (ROOT / 'common' / 'trainer.py',) if path.exists()]
    for name, module, tree in (('swin', swin, swin._C), ('cvt', cvt, cvt.config)):
        code = ''.join(path.read_text() for path in readers[name] + shared)
        for key, _ in unread_leaves(tree, module.UNREAD):
            assert f'.{key}' not in code, f'{name}: {key} is listed as unread but the trainer reads it'
