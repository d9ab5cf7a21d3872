"""eval_align='bank': the FIFO queue (what common/ista2.py keeps) against a running average per representative
slot (the alternative), on a PVTv2-B0 ISTA2 model (published settings, 'mean' representatives) trained briefly
on CIFAR-10 at 32 px on the CPU.

    python benchmarks/bank_alternatives.py --data /tmp/cifar10 [--train-images 20000] [--val-images 2000]

One training run fills the queue (bank_size rows) and, beside it, an exponential moving average of each
layer's batch-mean representative (momentum --momentum). The trained weights are then evaluated with each
way of aligning: 'batch' (batches of --batch-size, class order and one shuffled order), the queue, the running
average (the bank set to that one row), and 'off'. Prints top-1, and the share of predictions equal to those
of 'batch' in shuffled batches (the behaviour the weights were trained for) and the mean absolute difference of
the logits from them.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.ista2 import ISTA2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'PVT' / 'classification'))
from pvt_v2 import create_model  # noqa: E402

MEAN, STD = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1), torch.tensor([0.247, 0.243, 0.261]).view(3, 1, 1)


def load(folder, per_class, seed):
    """The first `per_class` images (in a seeded order) of each class of an ImageNet-layout folder."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(sorted(os.listdir(folder))):
        files = sorted(os.listdir(os.path.join(folder, name)))
        for file in rng.permutation(files)[:per_class]:
            images.append(np.asarray(Image.open(os.path.join(folder, name, file)).convert('RGB')))
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255)
    return (x - MEAN) / STD, torch.tensor(labels)


def add_running_average(model, momentum):
    """Beside each bank, `average`: an EMA of the batch mean of the representatives queued at each step."""
    for m in model.modules():
        if isinstance(m, ISTA2):
            m.average = None
            update = m._update_bank

            def wrapped(reps, gathered, m=m, update=update):
                update(reps, gathered)
                mean = reps.detach().flatten(0, 1).mean(0)
                m.average = mean if m.average is None else m.average.mul(momentum).add_(mean, alpha=1 - momentum)
            m._update_bank = wrapped


def set_mode(model, mode):
    """mode: 'batch', 'queue', 'average' or 'off'."""
    for m in model.modules():
        if isinstance(m, ISTA2):
            if not hasattr(m, 'queue'):
                m.queue = (m.bank.clone(), m.bank_count.clone())
            m.eval_align = {'queue': 'bank', 'average': 'bank'}.get(mode, mode)
            bank, count = m.queue
            if mode == 'average':
                bank = torch.zeros_like(bank)
                bank[0], count = m.average, torch.ones_like(count)
            m.bank.copy_(bank)
            m.bank_count.copy_(count)


@torch.no_grad()
def predict(model, x, batch_size, order):
    """-> the logits of every image of x, run in batches of `batch_size` in the given order."""
    logits = torch.empty(len(x), 10)
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        logits[idx] = model(x[idx])
    return logits


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', required=True)
    parser.add_argument('--train-images', type=int, default=20000)
    parser.add_argument('--val-images', type=int, default=2000)
    parser.add_argument('--epochs', type=int, default=1)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--bank-size', type=int, default=256)
    parser.add_argument('--momentum', type=float, default=0.99)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.time()
    x_train, y_train = load(os.path.join(args.data, 'train'), args.train_images // 10, args.seed)
    x_val, y_val = load(os.path.join(args.data, 'val'), args.val_images // 10, args.seed)
    print(f'loaded {len(x_train)} + {len(x_val)} images in {time.time() - start:.0f} s')
    model = create_model('pvt_v2_b0', num_classes=10, drop_path_rate=0.1, ista2_args=dict(
        qk_norm=True, v_norm=True, ista2_method='v', attn_inter_topk=1, rep_tkn_type='mean', eval_align='bank',
        bank_size=args.bank_size))
    add_running_average(model, args.momentum)
    steps = args.epochs * (len(x_train) // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    model.train()
    start, step = time.time(), 0
    for _ in range(args.epochs):
        order = torch.randperm(len(x_train))
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            idx = order[i:i + args.batch_size]
            x = x_train[idx]
            flip = torch.rand(len(x)) < 0.5
            x[flip] = x[flip].flip(-1)
            loss = F.cross_entropy(model(x), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % 50 == 0:
                print(f'step {step}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f} s)', flush=True)
    model.eval()
    shuffled = torch.randperm(len(x_val), generator=torch.Generator().manual_seed(0))
    class_order = torch.arange(len(x_val))
    results = {}
    set_mode(model, 'batch')
    results['batch, shuffled'] = predict(model, x_val, args.batch_size, shuffled)
    results['batch, class order'] = predict(model, x_val, args.batch_size, class_order)
    for mode in ('queue', 'average', 'off'):
        set_mode(model, mode)
        results[f'{mode}'] = predict(model, x_val, args.batch_size, shuffled)
    set_mode(model, 'queue')
    single = predict(model, x_val[:200], 1, torch.arange(200))
    torch.testing.assert_close(single, results['queue'][:200], rtol=1e-4, atol=1e-4)  # batch 1 = batch 64
    reference = results['batch, shuffled']
    print(f'{steps} steps of {args.batch_size}, bank_size {args.bank_size}, momentum {args.momentum}, '
          f'{len(x_val)} val images; columns 3-4 against batch, shuffled')
    print(f'{"evaluation":<22} {"top-1":>6} {"same prediction":>16} {"mean |logit diff|":>18}')
    for name, logits in results.items():
        top1 = (logits.argmax(-1) == y_val).float().mean().item() * 100
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item() * 100
        distance = (logits - reference).abs().mean().item()
        print(f'{name:<22} {top1:6.2f} {agree:16.2f} {distance:18.4f}')


if __name__ == '__main__':
    main()
