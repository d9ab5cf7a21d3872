"""Image folders decoded once into memory (common/data.py hold_in_memory): the same pixels as reading the files,
so the same training samples under the same seeds, also through data-loading workers; too large a data set, an
unreadable file and a data set that is no image folder are each reported."""
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import FakeData

from common import data
from common.errors import ConfigError

# (size, PIL mode, file suffix): what a folder may mix; every mode is converted to RGB
IMAGES = [((32, 32), 'RGB', '.jpg'), ((40, 24), 'RGB', '.png'), ((17, 33), 'L', '.png'), ((30, 30), 'P', '.png'),
          ((25, 20), 'RGBA', '.png'), ((64, 48), 'RGB', '.jpeg')]


@pytest.fixture
def mixed_folder(tmp_path):
    """Two classes, each holding every kind of IMAGES (random pixels)."""
    rng = np.random.default_rng(0)
    for label in ('a', 'b'):
        (tmp_path / label).mkdir()
        for i, ((w, h), mode, suffix) in enumerate(IMAGES):
            pixels = rng.integers(0, 256, (h, w, len(mode) if mode.startswith('RGB') else 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(tmp_path / label / f'{i}{suffix}')
    return str(tmp_path)


def samples(dataset, indices):
    """dataset[i] for each index, every generator seeded as a training epoch seeds them."""
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    return [dataset[i] for i in indices]


def test_memory_holds_each_files_pixels_in_rgb(mixed_folder):
    from_files, in_memory = data.image_folder(mixed_folder), data.image_folder(mixed_folder)
    lines = []
    data.hold_in_memory(in_memory, '--data-in-memory', lines.append)
    assert len(lines) == 1 and '12 images decoded into memory' in lines[0]
    expected_bytes = 2 * sum(w * h * 3 for (w, h), _, _ in IMAGES)
    assert in_memory.loader.nbytes == expected_bytes
    for path, _ in from_files.samples:
        image = in_memory.loader(path)
        assert image.mode == 'RGB'
        assert np.array_equal(np.asarray(image), np.asarray(data.read_rgb(path))), path


@pytest.mark.parametrize('training', [True, False])
def test_training_samples_are_those_of_the_files_under_the_same_seeds(mixed_folder, training):
    transform = data.train_transform(32) if training else data.eval_transform(32, center_crop=False)
    folders = [data.image_folder(mixed_folder) for _ in range(2)]
    data.hold_in_memory(folders[1], 'in_memory', print)
    for folder in folders:
        folder.transform = transform
    order = [5, 0, 11, 3, 7, 7]
    for (a, label_a), (b, label_b) in zip(*(samples(f, order) for f in folders), strict=True):
        assert label_a == label_b and torch.equal(a, b)


def test_loader_workers_read_the_images_held_in_memory_not_the_files(mixed_folder):
    folder = data.image_folder(mixed_folder)
    folder.transform = data.eval_transform(24, center_crop=False)
    batches = [torch.cat([x for x, _ in DataLoader(folder, batch_size=5, num_workers=2)])]
    data.hold_in_memory(folder, 'in_memory', print)
    shutil.rmtree(mixed_folder)
    batches.append(torch.cat([x for x, _ in DataLoader(folder, batch_size=5, num_workers=2)]))
    assert len(batches[1]) == 12 and torch.equal(*batches)


def test_decoding_stops_once_the_memory_budget_is_spent_naming_the_option(mixed_folder, monkeypatch):
    """Chunks of 4 images: the first takes 10,335 bytes decoded, the first two 27,003; two processes on this
    machine share 80% of 50,000 available bytes."""
    monkeypatch.setattr(data.DecodedImages, 'CHUNK', 4)
    monkeypatch.setattr(data, 'available_memory', lambda: 50_000)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    with pytest.raises(ConfigError, match=r'DATA\.IN_MEMORY: the first 8 of 12 images take 0\.00 GiB decoded .* more '
                                          r'than the 0\.0 GiB .* leave DATA\.IN_MEMORY off'):
        data.hold_in_memory(data.image_folder(mixed_folder), 'DATA.IN_MEMORY', print)
    monkeypatch.setattr(data, 'available_memory', lambda: 110_000)
    images = data.image_folder(mixed_folder)
    data.hold_in_memory(images, 'DATA.IN_MEMORY', print)  # 44,000 bytes: enough
    assert images.loader.nbytes == 2 * sum(w * h * 3 for (w, h), _, _ in IMAGES) == 42_102


def test_an_unreadable_image_is_named(mixed_folder):
    broken = f'{mixed_folder}/b/broken.jpg'
    with open(broken, 'wb') as f:
        f.write(b'not a jpeg')
    with pytest.raises(data.ImageReadError, match=f'cannot read image {broken}'):
        data.hold_in_memory(data.image_folder(mixed_folder), 'in_memory', print)


def test_a_data_set_that_is_no_image_folder_is_left_as_it_is():
    lines, images = [], FakeData(size=4)
    data.hold_in_memory(images, '--data-in-memory', lines.append)
    assert lines == ['--data-in-memory: FakeData holds its images in memory already']
