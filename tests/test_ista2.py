"""ISTA2 against the per-token float64 oracle of common/ista2_oracle.py, written from the formulas in docs/method.md."""
import pytest
import torch
from torch import nn

from common import ista2
from common.ista2 import ISTA2
from common.ista2_oracle import naive_ista2

pytestmark = pytest.mark.usefixtures('float64')  # the oracle comparisons run in float64


@pytest.fixture(autouse=True, params=['fused', 'torch'])
def code_path(request, monkeypatch):
    """Every test runs on the fused CPU kernels and on the torch code path."""
    fused = request.param == 'fused'
    monkeypatch.setattr(ista2, 'CPU_KERNELS', fused)
    if fused:
        assert ista2._load_cpu_kernels() is not None, 'the fused CPU kernels did not build: see the warning'
    return request.param


def make(dim=6, heads=2, norm=None, **kw):
    norms = dict(qk_norm=norm is not None, v_norm=norm is not None, norm_type=norm or 'rmsnorm')
    m = ISTA2(dim, heads, qk_scale=0.7, v_scale=0.9, **norms, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))  # norms must not be the identity for the test to mean anything
    return m


def qkv(b=4, p1=5, p2=5, c=6):
    return torch.randn(b, p1, c), torch.randn(b, p2, c), torch.randn(b, p2, c)


ALIGN = dict(ista2_method='v')
REPS = {None: {}, 'mean': {}, 'cls': dict(cls_tkn_idx=1), 'cls+bg': dict(cls_tkn_idx=1, bg_tkn_idx=0),
        'random': dict(rep_tkn_ratio=0.4)}


@pytest.mark.parametrize('rep', list(REPS))
@pytest.mark.parametrize('topk', [1, 3, 100])
@pytest.mark.parametrize('bs_ratio', [None, 0.5])
@pytest.mark.parametrize('norm', [None, 'rmsnorm', 'layernorm'])
def test_matches_naive(rep, topk, bs_ratio, norm):
    torch.manual_seed(0)
    m = make(norm=norm, attn_inter_topk=topk, rep_tkn_type=rep, bs_ratio=bs_ratio, **ALIGN, **REPS[rep]).eval()
    q, k, v = qkv(p1=7)
    out = m(q, k, v)
    assert out.shape == q.shape
    assert torch.allclose(out, naive_ista2(m, q, k, v, images=4), atol=1e-9, rtol=0)


@pytest.mark.parametrize('rep', [None, 'mean', 'random'])
@pytest.mark.parametrize('real_b', [2, None])
@pytest.mark.parametrize('topk', [1, 2])
def test_swin_windows_align_per_image(rep, real_b, topk):
    torch.manual_seed(1)
    m = make(is_swin=True, norm='rmsnorm', attn_inter_topk=topk, rep_tkn_type=rep, **ALIGN, **REPS[rep]).eval()
    images, windows, tokens = 2 + (real_b is None), 2, 4
    q, k, v = qkv(b=images * windows, p1=tokens, p2=tokens)
    rel_bias = torch.randn(2, tokens, tokens)
    mask = torch.zeros(windows, tokens, tokens)
    mask[1, :2, 2:] = mask[1, 2:, :2] = -100.
    out = m(q, k, v, real_b=real_b, relative_position_bias=rel_bias, mask=mask)
    assert torch.allclose(out, naive_ista2(m, q, k, v, images, rel_bias, mask), atol=1e-9, rtol=0)


def test_swin_without_mask_needs_real_b():
    m = make(is_swin=True, attn_inter_topk=1, rep_tkn_type='mean', **ALIGN)
    q, k, v = qkv(b=4)
    with pytest.raises(ValueError, match='real_b'):
        m(q, k, v)
    with pytest.raises(ValueError, match='real_b=3'):
        m(q, k, v, real_b=3)
    assert torch.allclose(m(q, k, v, real_b=2), naive_ista2(m, q, k, v, images=2), atol=1e-9, rtol=0)


def test_baseline_is_plain_attention():
    m = ISTA2(6, 2, qk_scale=0.5)
    q, k, v = qkv(p1=3)
    ref = torch.softmax(q.view(4, 3, 2, 3).transpose(1, 2) @ k.view(4, 5, 2, 3).permute(0, 2, 3, 1) * 0.5, -1)
    ref = (ref @ v.view(4, 5, 2, 3).transpose(1, 2)).transpose(1, 2).reshape(4, 3, 6)
    assert torch.allclose(m(q, k, v), ref, atol=1e-12)
    assert list(m.state_dict()) == []


def test_batch_of_one_is_plain_attention_with_the_norms():
    m = make(norm='rmsnorm', attn_inter_topk=1, rep_tkn_type='mean', **ALIGN)
    plain = make(norm='rmsnorm')
    plain.load_state_dict(m.state_dict())
    q, k, v = qkv(b=1)
    assert torch.equal(m(q, k, v), plain(q, k, v))


def test_permuting_the_batch_permutes_the_output():
    m = make(norm='rmsnorm', attn_inter_topk=2, rep_tkn_type=None, **ALIGN)
    q, k, v = qkv(b=5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(m(q, k, v)[perm], m(q[perm], k[perm], v[perm]), atol=1e-12)


def test_a_sample_never_aligns_with_itself():
    # The only other image's cls token is zero, so each token of image 0 mixes with a zero vector:
    # v' = sigmoid(v_scale * |v|^2) * v. Had its own cls token been a candidate, it would differ.
    m = make(attn_inter_topk=1, rep_tkn_type='cls', cls_tkn_idx=0, **ALIGN)
    q, k, v = qkv(b=2)
    v[1, 0] = 0
    per_head = v[0].view(5, 2, 3)
    aligned = (torch.sigmoid(0.9 * per_head.square().sum(-1, keepdim=True)) * per_head).reshape(1, 5, 6)
    plain = ISTA2(6, 2, qk_scale=0.7)
    assert torch.allclose(m(q, k, v)[:1], plain(q[:1], k[:1], aligned), atol=1e-12)


@pytest.mark.parametrize('rep', [None, 'mean'])
@pytest.mark.parametrize('topk', [1, 2])
@pytest.mark.parametrize('bs_ratio', [None, 0.5])
def test_kept_winners_are_the_best_allowed_candidates(rep, topk, bs_ratio):
    m = make(norm='rmsnorm', attn_inter_topk=topk, rep_tkn_type=rep, bs_ratio=bs_ratio, **ALIGN)
    m.keep_winners = True
    q, k, v = qkv(b=5)
    m(q, k, v)
    vn = m.v_norm_layer(v).detach().view(5, 5, 2, 3)  # (images, tokens, heads, d)
    reps = vn if rep is None else vn.mean(1, keepdim=True)  # (images, J, heads, d)
    per_image = reps.shape[1]
    others = 4 if bs_ratio is None else 2  # the first `others` images other than itself
    assert m.winners.shape == (5, 5, 2, topk)
    for image in range(5):
        pool = [j for j in range(5) if j != image][:others]
        scores = torch.einsum('thd,jrhd->thjr', vn[image], reps[pool]).flatten(2)  # (tokens, heads, candidates)
        won = m.winners[image]  # indices image * J + r into the first others + 1 images' representatives
        assert set((won // per_image).unique().tolist()) <= set(pool)
        place = torch.tensor([pool.index(j) if j in pool else -1 for j in range(5)])  # pool image -> place in pool
        chosen = scores.gather(-1, place[won // per_image] * per_image + won % per_image)
        assert torch.allclose(chosen.sort(-1, descending=True).values, scores.topk(topk, -1).values, atol=1e-12)


def test_topk_is_clamped_to_the_candidates():
    q, k, v = qkv(b=3)
    big = make(attn_inter_topk=50, rep_tkn_type='mean', **ALIGN)
    exact = make(attn_inter_topk=2, rep_tkn_type='mean', **ALIGN)
    assert torch.allclose(big(q, k, v), exact(q, k, v), atol=1e-12)
    assert big(q[:2], k[:2], v[:2]).shape == (2, 5, 6)


def test_bs_ratio_uses_the_first_other_samples():
    # 5 images, ratio 0.5: each image uses the first 2 of its 4 others, so image 3 serves nobody
    # (0 uses 1,2; 1 uses 0,2; 2, 3 and 4 use 0,1) while image 2 serves images 0 and 1.
    q, k, v = qkv(b=5)
    m = make(attn_inter_topk=1, rep_tkn_type='mean', bs_ratio=0.5, **ALIGN)
    out = m(q, k, v)
    for changed, untouched, touched in ((3, [0, 1, 2, 4], 3), (2, [3, 4], 0)):
        v2 = v.clone()
        v2[changed] = torch.randn_like(v2[changed])
        out2 = m(q, k, v2)
        assert torch.allclose(out[untouched], out2[untouched], atol=1e-12)
        assert not torch.allclose(out[touched], out2[touched])


def test_random_tokens_are_redrawn_in_training_and_fixed_in_eval():
    m = make(attn_inter_topk=1, rep_tkn_type='random', rep_tkn_ratio=0.5, **ALIGN)
    q, k, v = qkv(p2=40)
    m.eval()
    first = m(q, k, v)
    drawn = m.random_tkn_idxs.clone()
    assert len(drawn) == 20 and torch.equal(m(q, k, v), first)
    assert torch.equal(m.random_tkn_idxs, drawn)
    m.train()
    torch.manual_seed(0)
    m(q, k, v)
    a = m.random_tkn_idxs.clone()
    m(q, k, v)
    assert not torch.equal(a, m.random_tkn_idxs)


def test_cls_bg_background_query_has_no_gradient_path():
    m = make(attn_inter_topk=1, rep_tkn_type='cls+bg', cls_tkn_idx=1, bg_tkn_idx=0, **ALIGN)
    q, k, v = (t.requires_grad_() for t in qkv())
    m(q, k, v).sum().backward()
    assert q.grad[:, 0].abs().max() == 0 and q.grad[:, 1].abs().max() > 0


@pytest.mark.parametrize('rep', [r for r in REPS if r != 'cls+bg'])  # cls+bg stops a gradient on purpose
@pytest.mark.parametrize('topk', [1, 2])
@pytest.mark.parametrize('bs_ratio', [None, 0.5])
def test_gradients_match_finite_differences(rep, topk, bs_ratio):
    torch.manual_seed(0)
    m = make(dim=4, heads=2, norm='rmsnorm', attn_inter_topk=topk, rep_tkn_type=rep, bs_ratio=bs_ratio,
             **ALIGN, **REPS[rep]).eval()  # eval: 'random' keeps its positions between calls
    inputs = tuple(t.requires_grad_() for t in qkv(b=3, p1=3, p2=3, c=4))
    assert torch.autograd.gradcheck(lambda *x: m(*x), inputs)


def test_swin_gradients_match_finite_differences():
    torch.manual_seed(0)
    m = make(dim=4, heads=2, is_swin=True, norm='rmsnorm', attn_inter_topk=1, rep_tkn_type='mean', **ALIGN)
    inputs = tuple(t.requires_grad_() for t in qkv(b=6, p1=3, p2=3, c=4))
    assert torch.autograd.gradcheck(lambda *x: m(*x, real_b=3), inputs)


def test_dropout_applies_to_the_attention_weights_only():
    torch.manual_seed(0)
    drop = nn.Dropout(0.5)
    m = make(attn_inter_topk=1, rep_tkn_type='mean', attn_drop_layer=drop, **ALIGN)
    q, k, v = qkv()
    m.eval()
    drop.eval()
    no_drop = m(q, k, v)
    m.train()
    drop.train()
    assert not torch.allclose(m(q, k, v), no_drop)


def test_autocast_runs_and_stays_close_to_fp32():
    m = make(norm='rmsnorm', attn_inter_topk=1, rep_tkn_type='mean', **ALIGN).float()
    q, k, v = (t.float() for t in qkv())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = m(q, k, v)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), m(q, k, v), atol=0.1)


def test_state_dict_names_match_the_reference():
    m = make(norm='rmsnorm', attn_inter_topk=1, rep_tkn_type='mean', **ALIGN)
    assert list(m.state_dict()) == ['q_norm_layer.weight', 'k_norm_layer.weight', 'v_norm_layer.weight']
    ln = make(norm='layernorm')
    assert sorted(ln.state_dict()) == sorted(f'{x}_norm_layer.{p}' for x in 'qkv' for p in ('weight', 'bias'))


@pytest.mark.parametrize('kwargs, option', [
    (dict(norm_type='batchnorm'), 'norm_type'),
    (dict(ista2_method='qk'), 'ista2_method'),
    (dict(ista2_method='v'), 'attn_inter_topk'),
    (dict(attn_inter_topk=1), 'attn_inter_topk'),
    (dict(ista2_method='v', attn_inter_topk=-1), 'attn_inter_topk'),
    (dict(ista2_method='v', attn_inter_topk=1.5), 'attn_inter_topk'),
    (dict(rep_tkn_type='max'), 'rep_tkn_type'),
    (dict(rep_tkn_type='random'), 'rep_tkn_ratio'),
    (dict(rep_tkn_type='random', rep_tkn_ratio=1.5), 'rep_tkn_ratio'),
    (dict(rep_tkn_type='mean', rep_tkn_ratio=0.5), 'rep_tkn_ratio'),
    (dict(rep_tkn_type='cls'), 'cls_tkn_idx'),
    (dict(rep_tkn_type='cls+bg', cls_tkn_idx=1), 'bg_tkn_idx'),
    (dict(rep_tkn_type='cls+bg', cls_tkn_idx=1, bg_tkn_idx=1), 'bg_tkn_idx'),
    (dict(rep_tkn_type='mean', cls_tkn_idx=0), 'cls_tkn_idx'),
    (dict(bs_ratio=0), 'bs_ratio'),
    (dict(across_gpus='yes'), 'across_gpus'),
    (dict(num_heads=4), 'num_heads'),
])
def test_invalid_options_name_the_option(kwargs, option):
    kwargs = {'num_heads': 2, **kwargs}
    with pytest.raises(ValueError, match=option):
        ISTA2(6, **kwargs)


def test_integer_ratios_are_accepted():
    m = ISTA2(6, 2, ista2_method='v', attn_inter_topk=1, rep_tkn_type='random', rep_tkn_ratio=1, bs_ratio=1)
    assert m.rep_tkn_ratio == 1.0 and m.bs_ratio == 1.0


def test_fast_rmsnorm_equals_torch_rmsnorm_with_gradients():
    from common.ista2 import RMSNorm
    fast, ref = RMSNorm(8), nn.RMSNorm(8)
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(fast.weight)
    x = torch.randn(3, 5, 8, requires_grad=True)
    assert torch.allclose(fast(x), ref(x), atol=1e-12)
    assert torch.autograd.gradcheck(fast, (x,))
    g = torch.randn(3, 5, 8)
    grads = [torch.autograd.grad((m(x) * g).sum(), (x, m.weight)) for m in (fast, ref)]
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(*grads, strict=True))


def test_weightless_rmsnorm_gradients():
    from common.ista2 import _RMSNormFunction
    x = torch.randn(4, 6, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _RMSNormFunction.apply(t, None), (x,))


def assert_matches_oracle(m, q, k, v, images, rel_bias=None, mask=None, atol=1e-9, **call):
    """Output and the gradients of a random projection of it (w.r.t. q, k, v and the norm weights) equal
    the oracle's, which autograd differentiates through the formulas."""
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    wrt = inputs + list(m.parameters())
    out = m(*inputs, relative_position_bias=rel_bias, mask=mask, **call)
    probe = torch.randn_like(out)
    ours = torch.autograd.grad((out * probe).sum(), wrt)
    expected = naive_ista2(m, *inputs, images, rel_bias, mask)
    theirs = torch.autograd.grad((expected * probe).sum(), wrt)
    assert torch.allclose(out, expected, atol=atol, rtol=0)
    for name, a, b in zip(['q', 'k', 'v'] + [n for n, _ in m.named_parameters()], ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=atol, rtol=0), (name, (a - b).abs().max())


@pytest.mark.parametrize('rep', list(REPS))
@pytest.mark.parametrize('topk', [1, 2])
@pytest.mark.parametrize('bs_ratio', [None, 0.5])
def test_gradients_match_the_oracle(rep, topk, bs_ratio):
    torch.manual_seed(2)
    m = make(norm='rmsnorm', attn_inter_topk=topk, rep_tkn_type=rep, bs_ratio=bs_ratio, **ALIGN, **REPS[rep]).eval()
    assert_matches_oracle(m, *qkv(p1=7), images=4)


@pytest.mark.parametrize('topk', [1, 2])
def test_swin_gradients_match_the_oracle(topk):
    torch.manual_seed(3)
    m = make(is_swin=True, norm='rmsnorm', attn_inter_topk=topk, rep_tkn_type='mean', **ALIGN)
    tokens = 4
    mask = torch.zeros(2, tokens, tokens)
    mask[1, :2, 2:] = mask[1, 2:, :2] = -100.
    assert_matches_oracle(m, *qkv(b=6, p1=tokens, p2=tokens), 3, torch.randn(2, tokens, tokens), mask)


def test_chunks_cover_every_token_once_within_the_budget(monkeypatch):
    for budget, rows, tokens, row_bytes in [(1, 12, 4, 8), (24, 12, 4, 8), (40, 12, 4, 8), (10 ** 9, 12, 4, 8),
                                            (100, 35, 7, 10), (64, 35, 7, 10)]:
        monkeypatch.setattr(ista2, 'CHUNK_BYTES', budget)
        chunks = ista2._chunks(rows, tokens, row_bytes)
        assert [i for a, b in chunks for i in range(a, b)] == list(range(rows))
        for a, b in chunks:
            assert (b - a) * row_bytes <= max(budget, row_bytes)
            assert a // tokens == (b - 1) // tokens or (a % tokens == 0 and b % tokens == 0)


@pytest.mark.parametrize('budget', [1, 1000, 5000])  # bytes: a token per chunk, parts of an image, whole images
@pytest.mark.parametrize('rep, topk', [(None, 1), (None, 3), ('mean', 1), ('random', 2)])
def test_the_torch_path_scores_in_bounded_chunks(monkeypatch, code_path, budget, rep, topk):
    """Same results with any chunk size; no chunk of scores above the budget (or one token's scores)."""
    monkeypatch.setattr(ista2, 'CHUNK_BYTES', budget)
    sizes = []

    def masked_scores(*args):
        scores = masked_scores.wrapped(*args)
        sizes.append((scores.numel() * scores.element_size(), scores.shape[0] * scores.shape[2] * 8))
        return scores

    masked_scores.wrapped = ista2._masked_scores
    monkeypatch.setattr(ista2, '_masked_scores', masked_scores)
    torch.manual_seed(4)
    m = make(norm='rmsnorm', attn_inter_topk=topk, rep_tkn_type=rep, **ALIGN, **REPS[rep]).eval()
    assert_matches_oracle(m, *qkv(p1=3, p2=9), images=4)
    if code_path == 'torch' or topk > 1:
        assert sizes and all(size <= max(budget, row) for size, row in sizes)


@pytest.mark.parametrize('topk', [1, 3])
def test_backward_keeps_no_scores(code_path, topk):
    """What the alignment saves for the backward grows with the tokens, not with tokens x candidates."""
    m = make(dim=8, heads=2, attn_inter_topk=topk, rep_tkn_type=None, **ALIGN)
    v = torch.randn(6, 10, 8, requires_grad=True)  # 6 images of 10 tokens: 60 candidates per head
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = m._align(v)
    assert max(saved) <= v.numel() * topk and sum(saved) <= (4 + 3 * topk) * v.numel()
    out.sum().backward()
