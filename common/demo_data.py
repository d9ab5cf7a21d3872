"""A small, learnable ImageNet-layout dataset of synthetic shapes and textures.

    python -m common.demo_data OUT [--train-per-class 60] [--val-per-class 20] [--size 64]

writes OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg: ten classes, each a kind of shape or
texture in its own hue, drawn at a random position, scale and brightness on a random grey
background, with pixel noise. Hue and texture survive random crops, so a small transformer
learns it in a few epochs on a CPU.
"""
import argparse
import colorsys
import os

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('circle', 'square', 'triangle', 'cross', 'ring', 'h_stripes', 'v_stripes', 'checker', 'dots', 'diagonal')


def draw(kind, size, rng):
    """One RGB image (size x size) of class `kind`."""
    img = Image.new('RGB', (size, size), (int(rng.integers(0, 256)),) * 3)
    d = ImageDraw.Draw(img)
    hue = (CLASSES.index(kind) + rng.uniform(-0.3, 0.3)) / len(CLASSES)
    fg = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue % 1, rng.uniform(0.6, 1), rng.uniform(0.5, 1)))
    r = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    period = int(rng.integers(max(4, size // 10), max(6, size // 4)))
    if kind == 'circle':
        d.ellipse(box, fill=fg)
    elif kind == 'square':
        d.rectangle(box, fill=fg)
    elif kind == 'triangle':
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif kind == 'cross':
        w = r / 3
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)
    elif kind == 'ring':
        d.ellipse(box, outline=fg, width=max(2, int(r / 4)))
    elif kind in ('h_stripes', 'v_stripes', 'diagonal'):
        for s in range(-size, 2 * size, period):
            if kind == 'h_stripes':
                d.rectangle((0, s, size, s + period // 2), fill=fg)
            elif kind == 'v_stripes':
                d.rectangle((s, 0, s + period // 2, size), fill=fg)
            else:
                d.line((s, 0, s + size, size), fill=fg, width=max(2, period // 3))
    elif kind == 'checker':
        for y in range(0, size, period):
            for x in range(0, size, period):
                if (x // period + y // period) % 2:
                    d.rectangle((x, y, x + period - 1, y + period - 1), fill=fg)
    elif kind == 'dots':
        for y in range(period // 2, size, period):
            for x in range(period // 2, size, period):
                d.ellipse((x - period / 4, y - period / 4, x + period / 4, y + period / 4), fill=fg)
    else:
        raise ValueError(f'unknown class {kind!r}; valid: {CLASSES}')
    pixels = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def generate(root, train_per_class=60, val_per_class=20, size=64, seed=0):
    """Write the dataset under `root` (skipped if it is already complete); returns root."""
    rng = np.random.default_rng(seed)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for kind in CLASSES:
            folder = os.path.join(root, split, kind)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                image = draw(kind, size, rng)  # drawn even if present, so later images stay the same
                path = os.path.join(folder, f'{i:04d}.jpg')
                if not os.path.exists(path):
                    image.save(path + '.tmp.jpg', quality=90)
                    os.replace(path + '.tmp.jpg', path)
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out')
    parser.add_argument('--train-per-class', type=int, default=60)
    parser.add_argument('--val-per-class', type=int, default=20)
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    generate(args.out, args.train_per_class, args.val_per_class, args.size, args.seed)
    print(f'wrote {len(CLASSES)} classes to {args.out}/train and {args.out}/val')


if __name__ == '__main__':
    main()
