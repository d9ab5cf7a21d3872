"""across_gpus with two CPU processes (gloo): each rank must see the global batch."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.ista2 import ISTA2

WORLD, LOCAL_B, P, C, HEADS = 2, 3, 5, 8, 2


def build(across_gpus):
    torch.manual_seed(0)
    m = ISTA2(C, HEADS, qk_scale=0.5, v_scale=0.5, qk_norm=True, v_norm=True, ista2_method='v',
              attn_inter_topk=2, rep_tkn_type='mean', across_gpus=across_gpus).double()
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
    return m


def global_inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * LOCAL_B, P, C, generator=g, dtype=torch.float64) for _ in range(4)]


def rank_main(rank, init_file, results, local_sizes):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    try:
        q, k, v, g = global_inputs()
        if local_sizes:  # unequal batches: must raise, on every rank, instead of hanging
            try:
                build(True)(*(t[:local_sizes[rank]] for t in (q, k, v)))
            except ValueError as e:
                results[rank] = str(e)
            return
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        q, k, v, g = (t[rows].clone() for t in (q, k, v, g))
        v.requires_grad_()
        out = build(True)(q, k, v)
        (out * g).sum().backward()
        results[rank] = (out.detach(), v.grad)
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, local_sizes=None):
    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(str(tmp_path / 'init'), results, local_sizes), nprocs=WORLD)
    return dict(results)


def test_each_rank_equals_one_process_on_the_global_batch(tmp_path):
    results = run_ranks(tmp_path)
    q, k, v, g = global_inputs()
    m = build(False)
    for rank in range(WORLD):
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        v_all = v.clone().requires_grad_()
        out = m(q, k, v_all)
        # Rank r back-propagates its own loss through its local representatives only.
        (out[rows] * g[rows]).sum().backward()
        out_r, grad_r = results[rank]
        assert torch.allclose(out_r, out[rows].detach(), atol=1e-12)
        assert torch.allclose(grad_r, v_all.grad[rows], atol=1e-12)


def test_unequal_local_batches_fail_clearly(tmp_path):
    results = run_ranks(tmp_path, local_sizes=[2, 3])
    assert len(results) == WORLD
    for message in results.values():
        assert 'same local batch' in message and '[2, 3]' in message


def test_one_process_without_a_group_uses_the_local_batch():
    assert not dist.is_initialized()
    q, k, v, _ = global_inputs()
    assert torch.equal(build(True)(q, k, v), build(False)(q, k, v))
