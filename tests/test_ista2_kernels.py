"""The fused CPU kernels against the torch code path (tests/test_ista2.py runs both against the
per-token oracle in float64), in float32 and on the strided rows the backbones hand over; and their build."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import ista2
from tests.conftest import ROOT
from tests.test_ista2 import ALIGN, make, qkv


def test_fused_rmsnorm_on_strided_rows_matches_the_torch_path(monkeypatch):
    from common.ista2 import _RMSNormFunction
    qkv = torch.randn(2, 7, 3, 8, dtype=torch.float32)
    weight, grad = torch.rand(8) + 0.5, torch.randn(2, 7, 8)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(ista2, 'CPU_KERNELS', fused)
        for w in (None, weight.clone().requires_grad_()):
            x = qkv.clone().requires_grad_()
            # rows 24 values apart, as q/k/v from one Linear; the weight applied as ISTA2 applies it
            y = ista2._scaled(_RMSNormFunction.apply(x[:, :, 1], None), w)
            results.append((y, *torch.autograd.grad(y, [x] + ([w] if w is not None else []), grad)))
    for fused, unfused in zip(results[:2], results[2:], strict=True):
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fused, unfused, strict=True))


def test_fused_alignment_matches_the_torch_path_in_float32(monkeypatch):
    torch.manual_seed(0)
    m = make(dim=96, heads=3, is_swin=True, norm='rmsnorm', attn_inter_topk=1, rep_tkn_type='mean', **ALIGN).float()
    q, k, v = (t.float().requires_grad_() for t in qkv(b=12, p1=9, p2=9, c=96))
    results = []
    for fused in (True, False):
        monkeypatch.setattr(ista2, 'CPU_KERNELS', fused)
        out = m(q, k, v, real_b=3)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, *m.parameters()))))
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(*results, strict=True))


def test_a_failed_kernel_build_warns_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError('Ninja is required to load C++ extensions')

    monkeypatch.setattr(cpp_extension, 'load', no_compiler)
    with pytest.warns(UserWarning, match='could not be built .*Ninja is required.*ISTA2_CPU_KERNELS=0'):
        assert ista2._load_cpu_kernels.__wrapped__() is None


def test_a_build_killed_halfway_does_not_block_later_processes(tmp_path):
    """torch's lock file outlives a build killed halfway (Ctrl-C, a job's time limit); the next process loads. (torch
    2.4 waits as long as the file exists; later releases, 2.14 here, flock it and leave it in place.)"""
    folder = Path(ista2._load_cpu_kernels().__file__).parent
    shutil.copytree(folder, tmp_path / folder.name)  # the built kernels, so nothing needs building here
    (tmp_path / folder.name / 'lock').touch()
    load = 'from common import ista2; assert ista2._load_cpu_kernels() is not None'
    subprocess.run([sys.executable, '-c', load], cwd=ROOT, env={**os.environ, 'TORCH_EXTENSIONS_DIR': str(tmp_path)},
                   timeout=240, check=True)
