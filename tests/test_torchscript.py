"""TorchScript: torch.jit.trace of our backbones with and without ISTA2 and of a patched timm model gives the
eager outputs (at the batch size it was traced with: ISTA2's image count is read from the input's shape). With
torch.jit.script (ISTA2's torch code path, without the autograd Functions) the ISTA2 layer gives the oracle's outputs
and gradients, and our backbones and patched timm models give the eager outputs at any batch size, also after a
save and load."""
import io

import pytest
import timm
import torch

from common.ista2 import ISTA2
from common.timm_ista2 import UnsupportedModelError
from tests.test_fx import OURS, build
from tests.test_ista2 import ALIGN, REPS, assert_matches_oracle, make, qkv


@pytest.mark.parametrize('name', list(OURS) + ['deit_tiny_patch16_224'])
def test_traced_model_gives_the_eager_outputs(name):
    model = build(name)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        assert torch.allclose(traced(x), model(x), atol=1e-5, rtol=1e-5)


def saved_and_loaded(script):
    """A TorchScript module saved and loaded again: what a user deploys."""
    buffer = io.BytesIO()
    torch.jit.save(script, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def scripted(m):
    return saved_and_loaded(torch.jit.script(m))


@pytest.mark.usefixtures('float64')
@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('rep', list(REPS))
@pytest.mark.parametrize('topk', [1, 2])
def test_scripted_ista2_matches_the_oracle(rep, topk, training):
    torch.manual_seed(0)
    m = make(norm='rmsnorm', attn_inter_topk=topk, rep_tkn_type=rep, bs_ratio=0.5 if topk == 2 else None, **ALIGN,
             **REPS[rep]).train(training)
    assert_matches_oracle(scripted(m), *qkv(b=5, p1=7), images=5)


@pytest.mark.usefixtures('float64')
@pytest.mark.parametrize('norm', [None, 'layernorm'])
def test_scripted_ista2_matches_the_oracle_with_other_norms(norm):
    torch.manual_seed(1)
    m = make(norm=norm, attn_inter_topk=1, rep_tkn_type='mean', **ALIGN)
    assert_matches_oracle(scripted(m), *qkv(p1=7), images=4)


@pytest.mark.usefixtures('float64')
@pytest.mark.parametrize('real_b', [2, None])
def test_scripted_swin_windows_match_the_oracle(real_b):
    torch.manual_seed(2)
    m = make(is_swin=True, norm='rmsnorm', attn_inter_topk=1, rep_tkn_type='mean', **ALIGN)
    images, windows, tokens = 2 + (real_b is None), 2, 4
    mask = torch.zeros(windows, tokens, tokens)
    mask[1, :2, 2:] = mask[1, 2:, :2] = -100.
    q, k, v = qkv(b=images * windows, p1=tokens, p2=tokens)
    assert_matches_oracle(scripted(m), q, k, v, images, torch.randn(2, tokens, tokens), mask, real_b=real_b)


def test_a_scripted_bank_fills_and_evaluates_as_the_eager_one():
    torch.manual_seed(3)
    eager = make(norm='rmsnorm', attn_inter_topk=1, rep_tkn_type='mean', eval_align='bank', bank_size=6, **ALIGN)
    script = torch.jit.script(make(norm='rmsnorm', attn_inter_topk=1, rep_tkn_type='mean', eval_align='bank',
                                   bank_size=6, **ALIGN))
    script.load_state_dict(eager.state_dict())
    for images in (4, 4):  # wraps around the queue
        batch = qkv(b=images)
        assert torch.allclose(script(*batch), eager(*batch), atol=1e-5)
    assert int(script.bank_count) == int(eager.bank_count) == 8
    assert torch.allclose(script.bank, eager.bank, atol=1e-6)
    eager.eval(), script.eval()
    batch = qkv(b=3)
    assert torch.allclose(script(*batch), eager(*batch), atol=1e-5)
    assert not torch.allclose(eager(*batch), ISTA2.forward(eager.train(), *batch), atol=1e-3)  # the bank mattered


def test_scripting_across_gpus_warns_that_a_scripted_layer_aligns_within_its_batch():
    with pytest.warns(UserWarning, match='across_gpus=True has no effect'):
        torch.jit.script(ISTA2(8, 2, ista2_method='v', attn_inter_topk=1, rep_tkn_type='mean', across_gpus=True))


@pytest.mark.parametrize('name', list(OURS))
def test_a_scripted_backbone_gives_the_eager_outputs_at_any_batch_size(name):
    """Our backbones with and without ISTA2 compile whole, with the eager model's state_dict names; the compiled
    model, also after a save and load, gives the eager outputs at batch sizes it never saw (unlike a trace)."""
    model = build(name)
    script = torch.jit.script(model)
    assert list(script.state_dict()) == list(model.state_dict())
    deployed = saved_and_loaded(script)
    for images in (2, 3):
        x = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(images))
        with torch.no_grad():
            expected = model(x)
            assert torch.allclose(script(x), expected, atol=1e-5)
            assert torch.allclose(deployed(x), expected, atol=1e-5)


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224', 'swin_tiny_patch4_window7_224'])
def test_a_scripted_timm_model_gives_the_eager_outputs_at_any_batch_size(name):
    model = build(name)
    deployed = scripted(model)
    for images in (2, 3):
        x = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(images))
        with torch.no_grad():
            assert torch.allclose(deployed(x), model(x), atol=1e-5, rtol=1e-5)


def test_scripting_a_cls_bg_timm_model_is_refused_clearly():
    model = timm.create_model('deit_tiny_patch16_224_ista2', rep_tkn_type='cls+bg')
    with pytest.raises(UnsupportedModelError, match="rep_tkn_type='cls\\+bg'"):
        torch.jit.script(model)
