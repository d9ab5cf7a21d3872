"""Images per second that the training input pipeline delivers, reading image files against images decoded
into memory (the trainers' in-memory option, common/data.py hold_in_memory).

    python benchmarks/bench_data.py --data /tmp/cifar10 [--images 20000] [--size 32] [--batch 128] [--workers 2 8]

One pass over --images training images (every k-th of the train split, so that all classes appear) as a
training epoch draws them: shuffled, in batches of --batch, through the training transform of the 32 px
configs (padded random crop, flip, RandAugment, random erasing; timm's resized crop above 32 px), by
--workers loader processes started for the pass, as the trainers start them every epoch. A GPU step
faster than batch / (images/s) waits for its data.
"""
import argparse
import os
import sys
import time

import torch
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data  # noqa: E402


def images_per_second(dataset, batch, workers):
    loader = DataLoader(dataset, batch_size=batch, sampler=RandomSampler(dataset, generator=torch.Generator()
                                                                         .manual_seed(0)),
                        num_workers=workers, drop_last=True)
    start = time.perf_counter()
    count = sum(len(images) for images, _ in loader)
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', required=True, help='an image folder with train/ and val/ (e.g. CIFAR-10)')
    parser.add_argument('--images', type=int, default=20000)
    parser.add_argument('--size', type=int, default=32, help='the training resolution')
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--workers', type=int, nargs='+', default=[2])
    args = parser.parse_args()
    sets = {}
    for where in ('files', 'memory'):
        train_set, _ = data.image_folders(args.data)
        train_set.samples = train_set.samples[::max(1, len(train_set.samples) // args.images)][:args.images]
        train_set.transform = data.train_transform(args.size)
        if where == 'memory':
            data.hold_in_memory(train_set, 'in memory', print)
        sets[where] = train_set
    print(f'{len(sets["files"].samples)} training images of {args.data}, {args.size} px training transform, batch '
          f'{args.batch}, {os.cpu_count()} CPU cores')
    print(f'{"workers":>8} {"files img/s":>12} {"memory img/s":>13} {"memory x":>9}')
    for workers in args.workers:
        speed = {where: images_per_second(dataset, args.batch, workers) for where, dataset in sets.items()}
        print(f'{workers:8} {speed["files"]:12,.0f} {speed["memory"]:13,.0f} {speed["memory"] / speed["files"]:9.2f}')


if __name__ == '__main__':
    main()
