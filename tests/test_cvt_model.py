"""CvT models: upstream parameter counts and key names, equality with HuggingFace's CvT, ISTA2 wiring."""
import re
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from transformers import CvtConfig, CvtForImageClassification

CVT = Path(__file__).resolve().parents[1] / 'CVT' / 'classification'
sys.path.insert(0, str(CVT))
from common.checkpoint import load_weights  # noqa: E402

from lib.config import config as default_config  # noqa: E402
from lib.config import update_config  # noqa: E402
from lib.models import build_model  # noqa: E402
from lib.models.cls_cvt import QuickGELU  # noqa: E402


def config_path(name):
    return CVT / 'experiments' / 'imagenet' / 'cvt_ista2' / f'{name}.yaml'


def load(path, *opts):
    """The config file at `path` with KEY VALUE overrides, as the trainer loads it."""
    return update_config(default_config.clone(), Namespace(cfg=str(path), opts=opts))


def config(name, *opts):
    return load(config_path(name), *opts)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def to_huggingface(state):
    """Upstream CvT state_dict names -> HuggingFace CvtForImageClassification names."""
    rules = [
        (r'^stage(\d)\.patch_embed\.proj\.', r'cvt.encoder.stages.\1.embedding.convolution_embeddings.projection.'),
        (r'^stage(\d)\.patch_embed\.norm\.', r'cvt.encoder.stages.\1.embedding.convolution_embeddings.normalization.'),
        (r'^stage(\d)\.cls_token$', r'cvt.encoder.stages.\1.cls_token'),
        (r'^stage(\d)\.blocks\.(\d+)\.', r'cvt.encoder.stages.\1.layers.\2.'),
        (r'attn\.conv_proj_q\.conv\.', 'attention.attention.convolution_projection_query.convolution_projection.'
                                       'convolution.'),
        (r'attn\.conv_proj_k\.conv\.', 'attention.attention.convolution_projection_key.convolution_projection.'
                                       'convolution.'),
        (r'attn\.conv_proj_v\.conv\.', 'attention.attention.convolution_projection_value.convolution_projection.'
                                       'convolution.'),
        (r'attn\.conv_proj_q\.bn\.', 'attention.attention.convolution_projection_query.convolution_projection.'
                                     'normalization.'),
        (r'attn\.conv_proj_k\.bn\.', 'attention.attention.convolution_projection_key.convolution_projection.'
                                     'normalization.'),
        (r'attn\.conv_proj_v\.bn\.', 'attention.attention.convolution_projection_value.convolution_projection.'
                                     'normalization.'),
        (r'attn\.proj_q\.', 'attention.attention.projection_query.'),
        (r'attn\.proj_k\.', 'attention.attention.projection_key.'),
        (r'attn\.proj_v\.', 'attention.attention.projection_value.'),
        (r'attn\.proj\.', 'attention.output.dense.'),
        (r'mlp\.fc1\.', 'intermediate.dense.'), (r'mlp\.fc2\.', 'output.dense.'),
        (r'norm1\.', 'layernorm_before.'), (r'norm2\.', 'layernorm_after.'),
        (r'^norm\.', 'layernorm.'), (r'^head\.', 'classifier.'),
    ]
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def test_cvt13_counts_and_keys_equal_upstream():
    model = build_model(config('cvt-13-224x224'))
    keys = model.state_dict()
    assert n_params(model) == 19_997_480 and len(keys) == 459
    assert sum(k.endswith(('running_mean', 'running_var', 'num_batches_tracked')) for k in keys) == 117
    assert {'stage2.cls_token', 'stage0.blocks.0.attn.conv_proj_q.bn.running_mean', 'head.weight'} <= set(keys)


def test_cvt13_ista2_adds_the_norms_and_a_saved_deterministic_background_token():
    model = build_model(config('cvt-13-ista2-224x224'))
    base = build_model(config('cvt-13-224x224'))
    extra = set(model.state_dict()) - set(base.state_dict())
    assert n_params(model) == 20_010_344
    assert extra - {'stage2.bg_token'} == {k for k in extra if re.fullmatch(
        r'stage\d\.blocks\.\d+\.attn\.ista2\.[qkv]_norm_layer\.weight', k)}
    assert len(extra) == 39 + 1 and 'stage2.bg_token' in extra
    again = build_model(config('cvt-13-ista2-224x224'))
    assert torch.equal(again.stage2.bg_token, model.stage2.bg_token)  # the same in every process
    kinds = [b.attn.ista2.rep_tkn_type for s in range(3) for b in getattr(model, f'stage{s}').blocks]
    assert kinds == ['mean'] * 3 + ['cls+bg'] * 10
    block = model.stage2.blocks[0].attn.ista2
    assert (block.bg_tkn_idx, block.cls_tkn_idx) == (0, 1) and block.qk_scale == 384 ** -0.5


def test_baseline_equals_huggingface_cvt_given_the_same_weights():
    torch.manual_seed(0)
    ours = build_model(config('cvt-13-224x224')).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for name, buf in ours.named_buffers():
            if name.endswith(('running_mean', 'running_var')):
                buf.copy_(torch.rand_like(buf) + (0.5 if name.endswith('var') else -0.5))
    theirs = CvtForImageClassification(CvtConfig(num_labels=1000)).eval()
    theirs.load_state_dict(to_huggingface(ours.state_dict()))  # strict: every name maps
    for module in theirs.modules():
        if hasattr(module, 'activation') and isinstance(module.activation, torch.nn.GELU):
            module.activation = QuickGELU()  # upstream CvT's activation
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x).logits, atol=1e-4)


def test_reference_checkpoints_without_the_background_token_load():
    model = build_model(config('cvt-13-ista2-224x224'))
    state = {k: v for k, v in model.state_dict().items() if k != 'stage2.bg_token'}
    assert load_weights(model, state, allowed_missing=('bg_token',)) == ['stage2.bg_token']


def test_ista2_model_trains_and_a_batch_of_one_works():
    torch.manual_seed(0)
    model = build_model(config('cvt-13-ista2-224x224', 'MODEL.NUM_CLASSES', '5'))
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if 'ista2' in n)
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 5)  # upstream's squeeze() returned shape (5,)


def test_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match='cls_cvt_ista2'):
        build_model(config('cvt-13-224x224', 'MODEL.NAME', 'cls_hrnet'))


def edited_config(tmp_path, old, new):
    """The CvT-13 config with the line `old` replaced by `new`, loaded."""
    text = config_path('cvt-13-224x224').read_text()
    assert old in text
    path = tmp_path / 'cvt.yaml'
    path.write_text(text.replace(old, new))
    return load(path)


@pytest.mark.parametrize('old, new, message', [
    ('DEPTH: [1, 2, 10]', 'DEPTHS: [1, 2, 10]', "unknown config key MODEL.SPEC.DEPTHS \\(did you mean 'DEPTH'\\?\\)"),
    ('NUM_HEADS: [1, 3, 6]', 'NUM_HEADS: [1, 3]', r'NUM_HEADS=\[1, 3\]: give one value per stage \(NUM_STAGES=3\)'),
    ('POS_EMBED: [false, false, false]', 'POS_EMBED: [false, false, true]', 'CvT has no position embedding'),
    ("INIT: 'trunc_norm'", "INIT: 'kaiming'", "MODEL.SPEC.INIT='kaiming'; valid: trunc_norm, xavier"),
])
def test_a_spec_the_model_would_misread_is_refused(tmp_path, old, new, message):
    with pytest.raises((KeyError, ValueError), match=message):
        build_model(edited_config(tmp_path, old, new))


@pytest.mark.parametrize('old, new, message', [
    ('RE_PROB: 0.25', 'RE_PORB: 0.25', "unknown config key AUG.TIMM_AUG.RE_PORB \\(did you mean 'RE_PROB'\\?\\)"),
    ('RE_SPLIT: false', 'RE_SPLIT: true', 'RE_SPLIT true is not supported'),
    ('warmup_epochs: 5', 'warmup_epoch: 5', "unknown config key TRAIN.LR_SCHEDULER.ARGS.warmup_epoch \\(did you mean "
                                            "'warmup_epochs'\\?\\)"),
    ('LABEL_SMOOTHING: 0.1', 'LABEL_SMOOTH: 0.1', "unknown config key LOSS.LABEL_SMOOTH \\(did you mean "
                                                  "'LABEL_SMOOTHING'\\?\\)"),
])
def test_unread_keys_under_the_open_config_nodes_are_refused(tmp_path, old, new, message):
    with pytest.raises((KeyError, ValueError), match=message):
        edited_config(tmp_path, old, new)


def test_an_override_cannot_add_a_key_even_under_an_open_node():
    with pytest.raises(KeyError, match="no 'DEPTHS' under MODEL.SPEC \\(did you mean 'DEPTH'\\?\\); new keys here can "
                                       'only come from a config file'):
        config('cvt-13-224x224', 'MODEL.SPEC.DEPTHS', '[1, 2, 10]')
