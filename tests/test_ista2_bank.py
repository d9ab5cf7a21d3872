"""eval_align: the representative bank ('bank'), no alignment at evaluation ('off'), and the default ('batch')."""
import sys
from pathlib import Path

import pytest
import torch

from common import ista2
from common.checkpoint import CheckpointError
from common.errors import ConfigError
from common.ista2 import ISTA2, rebuild_banks
from common.trainer import Checkpoints, Recipe, restore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'PVT' / 'classification'))
from pvt_v2 import create_model  # noqa: E402

C, HEADS, P = 8, 2, 5
PUBLISHED = dict(qk_norm=True, v_norm=True, ista2_method='v', attn_inter_topk=1, rep_tkn_type='mean')


@pytest.fixture(autouse=True, params=['fused', 'torch'])
def code_path(request, monkeypatch):
    """Every test runs on the fused CPU kernels and on the torch code path."""
    monkeypatch.setattr(ista2, 'CPU_KERNELS', request.param == 'fused')
    return request.param


def build(seed=0, **options):
    torch.manual_seed(seed)
    m = ISTA2(C, HEADS, qk_scale=0.5, v_scale=0.5, **{**PUBLISHED, **options})
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
    return m


def qkv(b, seed, tokens=P):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, tokens, C, generator=g) for _ in range(3)]


def train_steps(m, steps=3, b=4, seed=100, tokens=P):
    m.train()
    for step in range(steps):
        m(*qkv(b, seed + step, tokens))
    m.eval()


def in_batches(fn, x, sizes=(1, 7, 32), seed=5):
    """fn on batches holding the image(s) x (one row of each tensor in x) among random companions, at random
    positions -> x's outputs, one per batch size."""
    g = torch.Generator().manual_seed(seed)
    outs = []
    for size in sizes:
        batch = [torch.randn(size, *t.shape[1:], generator=g) for t in x]
        at = int(torch.randint(size, (1,), generator=g))
        for t, row in zip(batch, x, strict=True):
            t[at] = row[0]
        outs.append(fn(*batch)[at])
    return outs


@pytest.mark.parametrize('options', [dict(), dict(attn_inter_topk=3), dict(rep_tkn_type=None, attn_inter_topk=2),
                                     dict(rep_tkn_type='cls+bg', cls_tkn_idx=1, bg_tkn_idx=0)])
def test_bank_evaluation_does_not_depend_on_the_batch(options):
    m = build(eval_align='bank', bank_size=10, **options)
    train_steps(m)
    x = qkv(1, seed=7)
    outs = in_batches(m, x)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6)
    # the batch mode of the same weights does depend on the companions
    batch_mode = build(**options)
    batch_mode.eval()
    outs = in_batches(batch_mode, x)
    assert not torch.allclose(outs[1], outs[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('topk', [1, 2])
def test_bank_evaluation_aligns_against_the_bank_rows_as_candidates(topk):
    """Bank evaluation of image x equals batch evaluation of [x, an image whose tokens are the bank's rows]
    with every token a representative (and no v norm, so that the bank rows enter unchanged)."""
    options = dict(rep_tkn_type=None, v_norm=False, attn_inter_topk=topk)
    m = build(eval_align='bank', bank_size=P, **options)
    train_steps(m, steps=2, b=3)  # 2 x 3 x 5 rows through a queue of 5: the last image's tokens remain
    assert int(m.bank_count) == 30
    q, k, v = qkv(1, seed=9)
    reference = build(**options).eval()
    fake_q, fake_k, _ = qkv(1, seed=10)
    both = reference(torch.cat([q, fake_q]), torch.cat([k, fake_k]), torch.cat([v, m.bank[None].clone()]))
    torch.testing.assert_close(m(q, k, v), both[:1], rtol=1e-5, atol=1e-6)


def test_the_bank_is_a_fifo_queue_of_all_representatives_without_gradient():
    m = build(eval_align='bank', bank_size=5)
    assert 'bank' not in dict(m.named_parameters()) and not m.bank.requires_grad
    assert set(dict(m.named_buffers())) == {'bank', 'bank_count'}
    m.train()
    reps = []
    for step in range(2):
        q, k, v = qkv(3, seed=step)
        v.requires_grad_()
        m(q, k, v).sum().backward()
        assert v.grad is not None and m.bank.grad is None
        reps.append(m.v_norm_layer(v).mean(1).detach())
    reps = torch.cat(reps)  # 6 rows: the first fell out of the queue of 5; row 5 overwrote slot 0
    assert int(m.bank_count) == 6
    torch.testing.assert_close(m.bank, torch.cat([reps[5:], reps[1:5]]))
    before = m.bank.clone()
    m.eval()
    m(*qkv(4, seed=3))
    assert torch.equal(m.bank, before) and int(m.bank_count) == 6  # evaluation leaves the bank alone


def test_off_evaluates_plain_attention_with_the_norms_and_trains_like_batch():
    off, plain, batch = build(eval_align='off'), build(ista2_method=None, attn_inter_topk=0), build()
    plain.load_state_dict(off.state_dict())
    batch.load_state_dict(off.state_dict())
    x = qkv(6, seed=1)
    torch.testing.assert_close(off.eval()(*x), plain.eval()(*x))
    torch.testing.assert_close(off.train()(*x), batch.train()(*x))
    assert not torch.allclose(off.train()(*x), plain.train()(*x))


def test_a_bank_layer_switched_to_batch_or_off_leaves_its_bank_alone():
    m = build(eval_align='bank', bank_size=6)
    with torch.no_grad():
        m(*qkv(4, seed=0))  # training: queues 4 rows
    bank, count = m.bank.clone(), int(m.bank_count)
    m.eval()
    for mode in ('batch', 'off'):
        m.eval_align = mode
        with torch.no_grad():
            m(*qkv(3, seed=1))
        assert int(m.bank_count) == count and torch.equal(m.bank, bank), mode


def test_bank_evaluation_of_a_layer_built_without_a_bank_is_refused():
    m = build().eval()
    m.eval_align = 'bank'
    with pytest.raises(ValueError, match="built with it"):
        m(*qkv(2, seed=0))


def test_state_dicts_without_a_bank_are_unchanged():
    assert set(build().state_dict()) == set(build(eval_align='off').state_dict())
    assert not any('bank' in k for k in build().state_dict())


def test_options_are_checked():
    with pytest.raises(ConfigError, match="eval_align='bank'.*needs ista2_method='v'"):
        ISTA2(C, HEADS, eval_align='bank')
    with pytest.raises(ConfigError, match="eval_align='all'"):
        build(eval_align='all')
    with pytest.raises(ConfigError, match='bank_size=0'):
        build(eval_align='bank', bank_size=0)


def test_an_empty_bank_evaluates_without_alignment_and_warns():
    m, off = build(eval_align='bank'), build(eval_align='off')
    x = qkv(4, seed=2)
    with pytest.warns(UserWarning, match="bank is empty.*the trainer's bank command"):
        out = m.eval()(*x)
    torch.testing.assert_close(out, off.eval()(*x))


def small_pvt(**options):
    torch.manual_seed(0)
    return create_model('pvt_v2_b0', num_classes=10, ista2_args=dict(PUBLISHED, **options))


def fill(model, steps=2, b=8):
    model.train()
    g = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(b, 3, 32, 32, generator=g))
    return model.eval()


@pytest.fixture(scope='module')
def trained_pvt():
    return fill(small_pvt(eval_align='bank', bank_size=16))


def test_a_pvt_bank_model_predicts_an_image_alike_in_batches_of_1_7_and_32(trained_pvt, code_path):
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = in_batches(trained_pvt, [image])
    for out in logits[1:]:
        torch.testing.assert_close(out, logits[0], rtol=1e-4, atol=1e-5)


def test_a_pvt_bank_survives_a_weights_only_round_trip(trained_pvt, tmp_path):
    state = trained_pvt.state_dict()
    assert 'block1.0.attn.ista2.bank' in state and int(state['block1.0.attn.ista2.bank_count']) == 16
    torch.save({'model': state}, tmp_path / 'ckpt.pth')
    fresh = small_pvt(eval_align='bank', bank_size=16)
    fresh.load_state_dict(torch.load(tmp_path / 'ckpt.pth', weights_only=True)['model'])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), trained_pvt(x))
    other_size = small_pvt(eval_align='bank', bank_size=8)
    with pytest.raises(CheckpointError, match='another shape'):
        restore(other_size, tmp_path / 'ckpt.pth', recipe(), print)


@pytest.mark.parametrize('bare', [True, False])
def test_a_checkpoint_without_banks_restores_with_a_message_and_rebuild_banks_refills_them(tmp_path, bare):
    source = small_pvt()  # the published model, no bank
    state = source.state_dict()
    torch.save(state if bare else {'model': state}, tmp_path / 'ckpt.pth')
    model, lines = small_pvt(eval_align='bank', bank_size=16), []
    restore(model, str(tmp_path / 'ckpt.pth'), recipe(), lines.append)
    assert any('no ISTA2 representative banks' in line and line.endswith('--rebuild-bank') for line in lines)
    assert all(int(m.bank_count) == 0 for m in model.modules() if isinstance(m, ISTA2))
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 3, 32, 32, generator=g), torch.zeros(8)) for _ in range(3)]
    model.train()
    assert rebuild_banks(model, loader) == 16 and model.training  # stops once every bank is full
    layers = [m for m in model.modules() if isinstance(m, ISTA2)]
    banks = [m.bank.clone() for m in layers]
    assert all(int(m.bank_count) == 16 for m in layers)
    rebuild_banks(model, loader)  # frozen: the same images give the same banks
    assert all(torch.equal(m.bank, b) for m, b in zip(layers, banks, strict=True))
    with pytest.raises(ValueError, match='no ISTA2 layer'):
        rebuild_banks(source, loader)


def recipe():
    """A recipe for `restore` alone, with the names the PVT trainer gives these settings."""
    return Recipe(None, None, Checkpoints(folder=None), 1, 1,
                  names={'rebuild_bank': '--rebuild-bank', 'eval_align': '--eval-align'})


@pytest.mark.parametrize('eval_align', ['batch', 'off'])
def test_a_checkpoint_with_banks_loads_into_a_model_without_one_with_a_message(trained_pvt, tmp_path, eval_align):
    torch.save({'model': trained_pvt.state_dict()}, tmp_path / 'ckpt.pth')
    model, lines = small_pvt(eval_align=eval_align), []
    restore(model, str(tmp_path / 'ckpt.pth'), recipe(), lines.append)
    assert len(lines) == 1 and 'banks (16 tensors) that this model does not use' in lines[0]
    assert '--eval-align' in lines[0]
    weights = {k: v for k, v in trained_pvt.state_dict().items() if '.ista2.bank' not in k}
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
