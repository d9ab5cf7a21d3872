"""Image-folder datasets, the timm train/eval transforms, samplers and loaders."""
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment as timm_augment
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from common.errors import ConfigError, MissingPathError, UserError
from common.runtime import seed_all


class ImageReadError(UserError, RuntimeError):
    """An image file that does not decode."""


def read_rgb(path):
    """The image at `path` in RGB. A file that does not decode stops the run naming it: skipping
    it would silently change the data (and the batch composition ISTA2 depends on)."""
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for truncated or foreign files
        raise ImageReadError(f'cannot read image {path}: {e}. Delete or replace the file and rerun; training '
                             f'resumes from the last checkpoint') from None


def image_folder(path):
    """ImageFolder over `path`/<class>/*, read with read_rgb; files without an image extension
    (torchvision's IMG_EXTENSIONS: notes, .DS_Store, ...) are skipped and counted in a warning."""
    skipped = []

    def is_image(file):
        keep = has_file_allowed_extension(file, IMG_EXTENSIONS)
        if not keep:
            skipped.append(file)
        return keep

    try:
        folder = datasets.ImageFolder(path, loader=read_rgb, is_valid_file=is_image)
    except FileNotFoundError as e:  # torchvision: no class folders, or a class folder without images
        raise MissingPathError(f'{path}: {str(e).strip()} (image extensions: {" ".join(IMG_EXTENSIONS)})') from None
    if skipped and int(os.environ.get('RANK', 0)) == 0:
        print(f'warning: {path}: skipped {len(skipped)} files without an image extension, e.g. {skipped[0]}',
              file=sys.stderr, flush=True)
    return folder


class DecodedImages:
    """Every image of a folder dataset decoded once (read_rgb) and held as uint8 pixels, H x W x 3 each, in
    one buffer per CHUNK images. Called with a file path, as the folder's loader is, it returns that image in
    RGB without reading the file: the same pixels, so training is unchanged, without a decode per sample.
    Data-loading workers share the buffers with their parent process (fork). Decoding stops with an error
    as soon as the images decoded so far take more than `budget_bytes`."""
    CHUNK = 256

    def __init__(self, paths, budget_bytes, option, threads):
        self.index = {path: i for i, path in enumerate(paths)}
        self.chunks = []  # (pixels (bytes,), offsets (n + 1,), shapes (n, 2): H, W) per CHUNK images
        self.nbytes = done = 0
        pool = ThreadPoolExecutor(threads)  # file reads and PIL's decoders run without the GIL
        try:
            for chunk in pool.map(decode_chunk, [paths[i:i + self.CHUNK] for i in range(0, len(paths), self.CHUNK)]):
                self.chunks.append(chunk)
                self.nbytes += chunk[0].nbytes
                done += len(chunk[2])
                if self.nbytes > budget_bytes:
                    raise ConfigError(
                        f'{option}: the first {done:,} of {len(paths):,} images take {self.nbytes / 2 ** 30:.2f} GiB '
                        f'decoded (all of them about {self.nbytes / done * len(paths) / 2 ** 30:.1f} GiB), more than '
                        f'the {budget_bytes / 2 ** 30:.1f} GiB this process may take (80% of the memory available, '
                        f'shared by the processes on this machine); leave {option} off')
        finally:
            pool.shutdown(cancel_futures=True)

    def __call__(self, path):
        chunk, i = divmod(self.index[path], self.CHUNK)
        pixels, offsets, shapes = self.chunks[chunk]
        return Image.fromarray(pixels[offsets[i]:offsets[i + 1]].reshape(*shapes[i], 3))


def decode_chunk(paths):
    """The images at `paths` decoded, as (their pixels in one uint8 buffer, offsets into it, (H, W) each)."""
    images = [np.asarray(read_rgb(path)) for path in paths]
    shapes = np.array([image.shape[:2] for image in images], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1] * 3)])
    return np.concatenate([image.reshape(-1) for image in images]), offsets, shapes


def available_memory():
    """Bytes of memory available to new allocations (Linux MemAvailable; elsewhere free pages)."""
    try:
        with open('/proc/meminfo') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    except (OSError, StopIteration):
        try:
            return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
        except (ValueError, OSError):  # neither is known here: no limit is checked
            return float('inf')


def hold_in_memory(dataset, option, log):
    """Decode every image of the folder `dataset` once and serve it from memory from now on (DecodedImages);
    `option` is the user's name for this, for messages. Each process holds its own copy."""
    if not isinstance(dataset, datasets.DatasetFolder):
        log(f'{option}: {type(dataset).__name__} holds its images in memory already')
        return
    processes = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    start = time.time()
    images = DecodedImages([path for path, _ in dataset.samples], 0.8 * available_memory() / processes, option,
                           threads=max(1, min(32, (os.cpu_count() or 1) // processes)))
    dataset.loader = images
    log(f'{option}: {dataset.root}: {len(dataset.samples):,} images decoded into memory '
        f'({images.nbytes / 2 ** 20:,.0f} MiB) in {time.time() - start:.1f} s')


def image_folders(root, train='train', val='val'):
    """ImageFolder datasets for root/train and root/val, checked to share one class list."""
    if not root or not os.path.isdir(root):
        raise MissingPathError(f'data path {root!r} is not a folder; expected <root>/{train}/<class>/*.jpg '
                                f'and <root>/{val}/<class>/*.jpg')
    folders = []
    for split in (train, val):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise MissingPathError(f'data path {root!r} has no {split!r} folder (expected {path}/<class>/*)')
        folders.append(image_folder(path))
    if folders[0].classes != folders[1].classes:
        only_train = sorted(set(folders[0].classes) - set(folders[1].classes))
        only_val = sorted(set(folders[1].classes) - set(folders[0].classes))
        raise ConfigError(f'{root}: the {train} and {val} folders have different classes '
                         f'(only in {train}: {only_train[:5]}, only in {val}: {only_val[:5]})')
    return folders


def train_transform(input_size, color_jitter=0.4, auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic',
                    re_prob=0.25, re_mode='pixel', re_count=1, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                    vflip=0., mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """timm's ImageNet training transform; at 32 px or less a padded random crop replaces the resized crop."""
    t = create_transform(input_size, is_training=True, color_jitter=color_jitter, auto_augment=auto_augment,
                         interpolation=interpolation, re_prob=re_prob, re_mode=re_mode, re_count=re_count,
                         scale=scale, ratio=ratio, hflip=hflip, vflip=vflip, mean=mean, std=std)
    if input_size <= 32:
        t.transforms[0] = transforms.RandomCrop(input_size, padding=4)
    for op in _augment_ops(t):
        if op.aug_fn is timm_augment.posterize:
            op.aug_fn = posterize
    return t


def posterize(img, bits_to_keep, **_):
    """timm's posterize, with 0 bits meaning a black image as in Pillow <= 10. RandAugment's 'inc1' posterize
    keeps 4 - 4 * magnitude / 10 bits, so 0 at magnitude 10 (the clipped tail of 'm9-mstd0.5'); Pillow 11
    made 0 bits a ValueError, and timm (1.0.11 to 1.0.31 at least) still asks for it."""
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return timm_augment.posterize(img, bits_to_keep)


def _augment_ops(transform):
    """The timm AugmentOps inside a Compose: RandAugment and AugMix hold `ops`, AutoAugment a `policy` of
    lists of them."""
    for t in getattr(transform, 'transforms', ()):
        yield from getattr(t, 'ops', ())
        for sub_policy in getattr(t, 'policy', ()):
            yield from sub_policy


def eval_transform(input_size, crop_pct=224 / 256, interpolation='bicubic', center_crop=True,
                   mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """Resize to input_size / crop_pct then center-crop (no resize at 32 px or less), or resize to a square."""
    mode = transforms.InterpolationMode(interpolation)
    if not center_crop:
        resize = [transforms.Resize((input_size, input_size), interpolation=mode)]
    elif input_size > 32:
        resize = [transforms.Resize(int(input_size / crop_pct), interpolation=mode), transforms.CenterCrop(input_size)]
    else:
        resize = []
    return transforms.Compose([*resize, transforms.ToTensor(), transforms.Normalize(mean, std)])


class ShardSampler(Sampler):
    """Rank r of W takes samples r, r+W, r+2W, ... of the dataset order (or of one fixed seeded
    shuffle of it), without the padding DistributedSampler adds, so that no image is counted
    twice in a distributed evaluation."""

    def __init__(self, dataset, rank, world_size, shuffle=False, seed=0):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle \
            else range(len(dataset))
        self.indices = order[rank::world_size]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def train_sampler(dataset, runtime, kind='distributed', seed=0):
    """kind: 'distributed' (shuffled shards) or 'repeated' (3 augmented repeats per image, as DeiT).

    One process shuffles the whole set. Repeated augmentation keeps the upstream per-epoch length
    (a multiple of 256 images) unless the dataset is smaller than that, when it keeps every image.
    """
    if not runtime.distributed:
        return RandomSampler(dataset)
    if kind == 'repeated':
        return RepeatAugSampler(dataset, runtime.world_size, runtime.rank, num_repeats=3,
                                selected_round=256 if len(dataset) >= 256 else 0)
    if kind == 'distributed':
        return DistributedSampler(dataset, runtime.world_size, runtime.rank, shuffle=True, seed=seed)
    raise ConfigError(f'unknown train sampler {kind!r}; valid: distributed, repeated')


def eval_sampler(dataset, runtime, sharded, shuffle=False, seed=0):
    """The whole set on every rank, or one interleaved shard per rank; in dataset (class) order,
    or shuffled once with `seed` (the same order on every rank)."""
    if sharded or shuffle:
        return ShardSampler(dataset, runtime.rank if sharded else 0, runtime.world_size if sharded else 1,
                            shuffle, seed)
    return SequentialSampler(dataset)


def loader(dataset, sampler, batch_size, workers, pin_memory, train):
    """Workers start afresh each pass and take their seeds from torch's global generator, which
    runtime.seed_all reseeds every epoch: a resumed epoch augments exactly as an uninterrupted one."""
    if train and len(sampler) < batch_size:
        raise ConfigError(f'the per-process batch size {batch_size} is larger than the {len(sampler)} training images '
                         f'this process gets per epoch; use a smaller batch size')
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=train)


def start_epoch(sampler, epoch, seed, rank):
    """Before training epoch `epoch`: the sampler's order for that epoch, and every random generator
    reseeded from (seed, rank, epoch) (see runtime.seed_all)."""
    if hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)
    seed_all(seed, rank, epoch)
