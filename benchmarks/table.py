"""`make table`: parameters, GFLOPs and measured speed of the paper's eight models, beside the paper's figures.

    python benchmarks/table.py [--batch 8] [--train-batch 128] [--rounds 5]

Each model is built from the config file the paper links to, through its backbone's own config
system (the registry, common/backbones.py). GFLOPs are fvcore's multiply-add count for one 224 px
image, with the attention matmuls counted (fvcore has no rule for scaled_dot_product_attention;
one is added here) and ISTA2's alignment off, as it is for a batch of one. The alignment's own
multiply-adds depend on how many other images share the batch; they are computed analytically
from every ISTA2 call's shapes and printed for the per-process training batch. Time ratios are
ISTA2 / baseline on this machine (train step: forward, backward, AdamW; inference: forward without
gradients), at --batch, the two models of a pair alternating.
"""
import argparse
import math
import os
import sys

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common.backbones import BACKBONES, config_name  # noqa: E402
from common.ista2 import ISTA2  # noqa: E402
from common.runtime import tune_cpu  # noqa: E402

from measure import time_step  # noqa: E402

# (params M, GFLOPs, top-1) as printed in the paper's table
PAPER = {'pvt_v2_b0': (3.7, 0.6, 70.8), 'pvt_v2_b0_ista2': (3.7, 0.6, 71.7),
         'pvt_v2_b2': (25.4, 4.0, 81.9), 'pvt_v2_b2_ista2': (25.4, 4.1, 82.4),
         'swin_tiny_patch4_window7_224': (28.3, 4.5, 81.2), 'swin_tiny_ista2_patch4_window7_224': (28.3, 4.9, 82.3),
         'cvt-13-224x224': (20.0, 4.6, 81.6), 'cvt-13-ista2-224x224': (20.0, 4.7, 82.3)}


def sdpa_macs(inputs, outputs):
    """softmax(q k^T) v: b*h*Lq*Lk*d for q k^T plus the same for the product with v."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = 1
    for s in q[:-2]:
        batch *= s
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def gflops(model, size):
    """Multiply-adds (G) of one image, alignment off (a batch of one)."""
    counter = FlopCountAnalysis(model.eval(), torch.randn(1, 3, size, size))
    counter.set_op_handle('aten::scaled_dot_product_attention', sdpa_macs)
    counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return counter.total() / 1e9


def alignment_gflops(model, size, batch):
    """Multiply-adds (G) per image of ISTA2's alignment when `batch` images share each call: every
    value token is scored against the (batch - 1) * J candidates, against itself, and mixed."""
    macs = []

    def hook(module, args, kwargs, output):
        if module.ista2_method != 'v':
            return
        rows, tokens, width = args[2].shape
        per_image = rows * tokens  # at batch 1 every row (Swin: window) belongs to the one image
        kind = module.rep_tkn_type
        candidates = {'mean': 1, 'cls': 1, 'cls+bg': 2, None: per_image}.get(kind) \
            or math.ceil(per_image * module.rep_tkn_ratio)
        k = min(module.attn_inter_topk, (batch - 1) * candidates)
        # scores against the candidates and against itself, then the mix of itself and k winners
        macs.append(per_image * width * ((batch - 1) * candidates + 2 + k) if batch > 1 else 0)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, ISTA2)]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    return sum(macs) / 1e9


def steps(model, batch, size):
    """(train step, inference step) callables for `model` at `batch`."""
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train():
        model.train()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer():
        model.eval()
        model(images)

    return train, infer


def time_ratios(models, batch, size, rounds):
    """ISTA2 / baseline (train, inference) times: the two models alternate, `rounds` times, medians."""
    runs = {name: [] for name in models}
    calls = {name: steps(model, batch, size) for name, model in models.items()}
    for _ in range(rounds):
        for name, (train, infer) in calls.items():
            runs[name].append((time_step(train, 1)['seconds'], time_step(infer, 1)['seconds']))
    (base, ista2) = (torch.tensor(r).median(0).values for r in runs.values())
    return (ista2 / base).tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=8, help='batch for the time ratios')
    parser.add_argument('--train-batch', type=int, default=128, help='per-process batch for the alignment GFLOPs')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=5, help='alternating timed steps per model')
    args = parser.parse_args()
    tune_cpu()
    torch.manual_seed(0)
    print(f'{"model":18} {"params M":>8} {"paper":>5}  {"GFLOPs":>6} {"paper":>5}  {"+align@1":>8} '
          f'{"+align@" + str(args.train_batch):>10}  {"train x":>7} {"infer x":>7}')
    for backbone in BACKBONES.values():
        for row, (baseline, ista2) in backbone.paper.items():
            models = {config_name(config): backbone.build(config) for config in (baseline, ista2)}
            ratios = time_ratios(models, args.batch, args.size, args.rounds)
            for name, model in models.items():
                params = sum(p.numel() for p in model.parameters()) / 1e6
                extra = [alignment_gflops(model, args.size, b) for b in (1, args.train_batch)]
                with_ista2 = name == config_name(ista2)
                title = row + (' + ISTA2' if with_ista2 else '')
                shown = tuple(f'{r:7.2f}' for r in ratios) if with_ista2 else ('', '')
                print(f'{title:18} {params:8.2f} {PAPER[name][0]:5.1f}  {gflops(model, args.size):6.2f} '
                      f'{PAPER[name][1]:5.1f}  {extra[0]:8.2f} {extra[1]:10.2f}  {shown[0]:>7} {shown[1]:>7}',
                      flush=True)
    print(f'GFLOPs: multiply-adds of one {args.size} px image; +align@N: ISTA2 alignment multiply-adds per image '
          f'when N images share a call; time ratios at batch {args.batch} on this machine '
          f'({torch.get_num_threads()} threads).')


if __name__ == '__main__':
    main()
