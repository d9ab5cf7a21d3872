"""The slow, obviously correct ISTA2: a per-token loop written from the formulas of docs/method.md, run in float64
on the CPU. tests/test_ista2.py and benchmarks/gpu_check.py compare common.ista2.ISTA2 (every code path, forward and
backward) with it."""
import itertools
import math

import torch


def rms_norm(x, w):
    eps = torch.finfo(x.dtype).eps
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def naive_ista2(m, q, k, v, images, rel_bias=None, mask=None):
    """ISTA2's output (b, p1, c), looping over every image, head and token; `m` (an ISTA2 module) supplies only
    options and norm weights. q (b, p1, c), k and v (b, p2, c) hold `images` images of b / images rows each (Swin
    windows); rel_bias (h, p1, p2) and mask (nW, p1, p2) as in ISTA2.forward. The output is made in the default
    dtype (float64 for a comparison). Differentiable: the winners are ranked on plain floats, the weights and the
    attention are tensors."""
    norms = {'q': m.q_norm_layer, 'k': m.k_norm_layer, 'v': m.v_norm_layer}

    def norm(x, name):  # told by the options, not the layer's class: `m` may be a TorchScript module
        if not (m.v_norm if name == 'v' else m.qk_norm):
            return x
        layer = norms[name]
        return rms_norm(x, layer.weight) if m.norm_type == 'rmsnorm' else layer_norm(x, layer.weight, layer.bias)

    b, p1, c = q.shape
    p2, h = k.shape[1], m.num_heads
    d = c // h
    rows = b // images
    Q, K, V = (norm(x, n).reshape(b, -1, h, d) for x, n in ((q, 'q'), (k, 'k'), (v, 'v')))
    aligned = V.clone()
    if m.ista2_method == 'v' and images > 1:
        n_others = images - 1 if m.bs_ratio is None else math.ceil((images - 1) * m.bs_ratio)
        for head in range(h):
            tokens = [[V[i * rows + w, t, head] for w in range(rows) for t in range(p2)] for i in range(images)]
            if m.rep_tkn_type is None:
                reps = tokens
            elif m.rep_tkn_type == 'mean':
                reps = [[sum(ts) / len(ts)] for ts in tokens]
            elif m.rep_tkn_type == 'cls':
                reps = [[ts[m.cls_tkn_idx]] for ts in tokens]
            elif m.rep_tkn_type == 'cls+bg':
                reps = [[ts[m.cls_tkn_idx], ts[m.bg_tkn_idx]] for ts in tokens]
            else:
                reps = [[ts[int(j)] for j in m.random_tkn_idxs] for ts in tokens]
            for i in range(images):
                others = [j for j in range(images) if j != i][:n_others]
                cands = [r for j in others for r in reps[j]]
                kk = min(m.attn_inter_topk, len(cands))
                for pos, x in enumerate(tokens[i]):
                    scores = [float((x @ r).detach()) * m.v_scale for r in cands]
                    best = sorted(range(len(cands)), key=lambda z: -scores[z])[:kk]
                    w = torch.softmax(torch.stack([x @ x] + [x @ cands[z] for z in best]) * m.v_scale, 0)
                    new = w[0] * x + sum(w[1 + a] * cands[z] for a, z in enumerate(best))
                    aligned[i * rows + pos // p2, pos % p2, head] = new
    out = torch.zeros(b, p1, h, d)
    for row, head, t in itertools.product(range(b), range(h), range(p1)):
        if m.rep_tkn_type == 'cls+bg' and t == m.bg_tkn_idx:  # minus the class query's logits, no gradient
            logits = torch.stack([-(Q[row, m.cls_tkn_idx, head] @ K[row, s, head]).detach() for s in range(p2)])
        else:
            logits = torch.stack([Q[row, t, head] @ K[row, s, head] for s in range(p2)])
        logits = logits * m.qk_scale
        if rel_bias is not None:
            logits = logits + rel_bias[head, t]
        if mask is not None:
            logits = logits + mask[row % mask.shape[0], t]
        a = torch.softmax(logits, 0)
        out[row, t, head] = sum(a[s] * aligned[row, s, head] for s in range(p2))
    return out.reshape(b, p1, c)
