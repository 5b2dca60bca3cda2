"""Data pipeline: ImageFolder and zip datasets written to tmp dirs, deterministic resumable
sampling, exact validation sharding, transforms, and the errors on bad data."""
import argparse
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from config import get_config
from data import DataError, build_loader
from data.build import build_mixup
from data.cached_image_folder import CachedImageFolder
from data.samplers import ResumableDistributedSampler, ShardSampler
from helpers import REPO, subprocess_env, zip_dataset

CLASSES = ('cat', 'dog', 'fox')
RED = (255, 0, 0)


def write_image_folder(root, train_per_class=6, val_per_class=(3, 2, 2), size=(40, 36)):
    """train/ and val/ ImageFolders of random RGB PNGs; 7 val images (an odd count)."""
    rng = np.random.default_rng(0)
    for split, counts in (('train', (train_per_class,) * len(CLASSES)), ('val', val_per_class)):
        for name, count in zip(CLASSES, counts):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f'{i}.png')
    return root


def make_config(data_path, *opts, **args):
    defaults = ['DATA.IMG_SIZE', '32', 'DATA.BATCH_SIZE', '4', 'DATA.NUM_WORKERS', '0']
    return get_config(argparse.Namespace(data_path=str(data_path), opts=defaults + list(opts), **args))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('images'))


def epoch_batches(loader, epoch, start_step=0):
    loader.sampler.set_epoch(epoch, start_step)
    return [(images.clone(), labels.clone()) for images, labels, _ in loader]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
        assert torch.equal(labels_a, labels_b)
        assert torch.equal(images_a, images_b)


def test_image_folder_loader_takes_classes_from_data(folder):
    config = make_config(folder)
    assert config.MODEL.NUM_CLASSES == 0
    loader_train, loader_val, class_names = build_loader(config)
    # the classes found reach the caller as a value; the config is left as it was
    assert class_names == list(CLASSES) and config.MODEL.NUM_CLASSES == 0 and config.is_frozen()
    assert (len(loader_train.dataset), len(loader_val.dataset)) == (18, 7)
    assert len(loader_train) == 18 // 4  # drop_last: every step has a full batch
    images, labels, replaced = next(iter(loader_train))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64 and replaced == []
    assert build_mixup(config, len(class_names)).num_classes == 3
    assert sum(len(labels) for _, labels in loader_val) == 7


def test_eval_mode_reads_only_val_and_released_num_classes_is_kept(tmp_path):
    write_image_folder(tmp_path)
    os.rename(tmp_path / 'train', tmp_path / 'not_train')
    config = make_config(tmp_path, 'MODEL.NUM_CLASSES', '1000', eval=True)
    loader_train, loader_val, class_names = build_loader(config)
    assert loader_train is None and class_names == list(CLASSES)
    assert len(loader_val.dataset) == 7 and config.MODEL.NUM_CLASSES == 1000


def normalized(pixels):
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    return (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - mean[:, None, None]) / std[:, None, None]


@pytest.mark.parametrize('crop', [True, False])
def test_eval_transform_centre_crops_away_a_marked_border(tmp_path, crop):
    """A 256 px image with an 8 px red border, evaluated at 224: TEST.CROP resizes the short side
    to 256 / 224 * 224 = 256 (no change) and crops the central 224, so what comes out is exactly
    the centre of the image, border gone; without it the whole image, border included, is resized."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 200, (256, 256, 3), dtype=np.uint8)
    pixels[:8], pixels[-8:], pixels[:, :8], pixels[:, -8:] = RED, RED, RED, RED
    os.makedirs(tmp_path / 'val' / 'cat')
    Image.fromarray(pixels).save(tmp_path / 'val' / 'cat' / '0.png')
    config = make_config(tmp_path, 'DATA.IMG_SIZE', '224', 'TEST.CROP', str(crop), eval=True)
    image, _ = build_loader(config)[1].dataset[0]
    assert image.shape == (3, 224, 224)
    red = normalized(np.array([[RED]], dtype=np.uint8))[:, 0, 0]
    edge_is_red = torch.allclose(image[:, 0, 112], red, atol=0.05)
    if crop:
        torch.testing.assert_close(image, normalized(pixels[16:240, 16:240]), rtol=0, atol=1e-5)
        assert not edge_is_red
    else:
        assert edge_is_red and torch.allclose(image[:, 112, 223], red, atol=0.05)


@pytest.mark.parametrize('cache_mode', ['no', 'part', 'full'])
def test_zip_dataset_matches_image_folder(folder, tmp_path, cache_mode):
    zipped = tmp_path / 'zipped'
    zip_dataset(folder, zipped)
    plain_train, plain_val, plain_classes = build_loader(make_config(folder))
    config = make_config(zipped, zip=True, cache_mode=cache_mode)
    loader_train, loader_val, class_names = build_loader(config)
    dataset_train = loader_train.dataset.dataset.dataset  # under SeededSamples(ReplaceUnreadable(...))
    assert isinstance(dataset_train, CachedImageFolder) and class_names == plain_classes == list(CLASSES)
    assert len(dataset_train) == len(plain_train.dataset) and len(loader_val.dataset) == len(plain_val.dataset)
    assert_same_batches(list(loader_val), list(plain_val))
    # same seed, same indices -> same augmented training batches as the folder dataset
    assert_same_batches(epoch_batches(loader_train, 1), epoch_batches(plain_train, 1))


def test_zip_part_cache_holds_this_process_shard(folder, tmp_path):
    zipped = tmp_path / 'zipped'
    zip_dataset(folder, zipped)
    part = CachedImageFolder(str(zipped / 'train.zip'), str(zipped / 'train_map.txt'),
                             cache_mode='part', rank=1, world_size=3)
    assert sorted(part.cache) == list(range(1, 18, 3))
    full = CachedImageFolder(str(zipped / 'train.zip'), str(zipped / 'train_map.txt'), cache_mode='full')
    assert len(full.cache) == 18
    # what is not cached is read from the zip
    assert np.array_equal(np.asarray(part[0][0]), np.asarray(full[0][0]))
    # a part cache samples only within the process's shard
    sampler = ResumableDistributedSampler(18, 4, num_replicas=3, rank=1, shard_first=True)
    assert {index for _, index in sampler} == set(range(1, 18, 3))


def test_augmentations_depend_on_seed_epoch_and_index_not_on_workers(folder):
    # RandAugment, random erasing, flips and random-resized crops at their defaults
    serial = build_loader(make_config(folder, 'DATA.IMG_SIZE', '40'))[0]
    state = torch.get_rng_state()
    batches_serial = epoch_batches(serial, epoch=3)
    assert torch.equal(torch.get_rng_state(), state), 'loading in-process must not move the RNG'
    parallel = build_loader(make_config(folder, 'DATA.IMG_SIZE', '40', 'DATA.NUM_WORKERS', '2'))[0]
    assert_same_batches(batches_serial, epoch_batches(parallel, epoch=3))
    # another epoch or another SEED: other augmentations of the same image
    samples = serial.dataset
    image, label, _ = samples[(3, 5)]  # the training set also reports replaced images
    assert torch.equal(samples[(3, 5)][0], image)
    assert samples[(4, 5)][1] == label and not torch.equal(samples[(4, 5)][0], image)
    reseeded = build_loader(make_config(folder, 'DATA.IMG_SIZE', '40', 'SEED', '1'))[0].dataset
    assert not torch.equal(reseeded[(3, 5)][0], image)


def test_resume_at_start_step_gives_the_tail_of_the_epoch(folder):
    loader = build_loader(make_config(folder, 'DATA.IMG_SIZE', '40'))[0]
    full_epoch = epoch_batches(loader, epoch=2)
    assert len(full_epoch) == 4
    assert_same_batches(epoch_batches(loader, epoch=2, start_step=3), full_epoch[3:])
    assert len(loader) == 4, 'len() stays the full epoch'


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_train_sampler_shards_one_permutation(world_size):
    shards = []
    for rank in range(world_size):
        sampler = ResumableDistributedSampler(11, 2, num_replicas=world_size, rank=rank, seed=5)
        sampler.set_epoch(7)
        shards.append([index for _, index in sampler])
        assert len(shards[-1]) == len(sampler) == -(-11 // world_size)
    assert set().union(*map(set, shards)) == set(range(11))
    assert sum(map(len, shards)) - 11 < world_size  # only the padding repeats


@pytest.mark.parametrize('shard_first', [False, True])
def test_train_order_is_drawn_from_seed_and_epoch(shard_first):
    def order(seed, epoch):
        sampler = ResumableDistributedSampler(40, 2, num_replicas=2, rank=1, seed=seed, shard_first=shard_first)
        sampler.set_epoch(epoch)
        return [index for _, index in sampler]

    assert order(5, 7) == order(5, 7)
    assert order(5, 8) != order(5, 7) and order(6, 7) != order(5, 7)
    if shard_first:  # the same shard, in another order
        assert sorted(order(5, 8)) == sorted(order(6, 7)) == list(range(1, 40, 2))


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_val_shards_cover_every_image_exactly_once(world_size):
    seen = [index for rank in range(world_size) for index in ShardSampler(7, world_size, rank)]
    assert sorted(seen) == list(range(7))


def test_val_loader_shards_by_rank(folder):
    seen = []
    for rank in range(3):
        loader_val = build_loader(make_config(folder, eval=True), rank, 3)[1]
        seen += list(loader_val.sampler)
    assert sorted(seen) == list(range(7))


@pytest.mark.parametrize('workers', [0, 2])
def test_corrupt_image_error_names_the_file(tmp_path, workers):
    """A worker's error reaches the loop as one line naming the file, and the iterator's workers are
    gone once it is raised (left to the garbage collector, they would linger until killed, seconds later)."""
    write_image_folder(tmp_path)
    bad = tmp_path / 'val' / 'dog' / '1.png'
    bad.write_bytes(b'not a png at all')
    loader_val = build_loader(make_config(tmp_path, 'DATA.NUM_WORKERS', str(workers)))[1]
    batches = iter(loader_val)
    with pytest.raises(DataError) as error:
        list(batches)
    message = str(error.value)
    assert str(bad) in message and '\n' not in message
    assert len(getattr(batches, '_workers', ())) == workers
    assert not any(worker.is_alive() for worker in getattr(batches, '_workers', ()))


CORRUPT_IMAGE_THEN_EXIT = """
import argparse, gc, sys
from config import get_config
from data import DataError, build_loader
config = get_config(argparse.Namespace(opts=['DATA.NUM_WORKERS', '2', 'DATA.BATCH_SIZE', '4'], data_path=sys.argv[1]))
loader = build_loader(config)[1]
try:
    list(loader)
except DataError:
    pass
del loader
gc.collect()
"""


def test_a_script_whose_loader_raised_in_a_worker_exits(tmp_path):
    """The workers of an iterator collected after a worker's DataError (they ignore SIGTERM) do not keep
    the interpreter from exiting (its multiprocessing hook waits for every child)."""
    write_image_folder(tmp_path)
    (tmp_path / 'val' / 'dog' / '1.png').write_bytes(b'not a png at all')
    result = subprocess.run([sys.executable, '-c', CORRUPT_IMAGE_THEN_EXIT, str(tmp_path)], cwd=REPO,
                            env=dict(subprocess_env(tmp_path), PYTHONPATH=REPO), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


def test_truncated_image_in_zip_names_the_member(folder, tmp_path):
    zipped = tmp_path / 'zipped'
    zip_dataset(folder, zipped)
    with zipfile.ZipFile(zipped / 'val.zip', 'a') as archive:
        archive.writestr('cat/truncated.png', (folder / 'val' / 'cat' / '0.png').read_bytes()[:60])
    with open(zipped / 'val_map.txt', 'a') as f:
        f.write('cat/truncated.png\t0\n')
    dataset = CachedImageFolder(str(zipped / 'val.zip'), str(zipped / 'val_map.txt'))
    with pytest.raises(DataError, match='val.zip@/cat/truncated.png'):
        dataset[len(dataset) - 1]


def test_missing_and_empty_data_folders(tmp_path):
    with pytest.raises(DataError, match=f'data folder not found: {tmp_path / "nowhere"}'):
        build_loader(make_config(tmp_path / 'nowhere'))
    (tmp_path / 'train').mkdir()
    (tmp_path / 'val').mkdir()
    with pytest.raises(DataError, match=f'no images in {tmp_path / "val"}'):
        build_loader(make_config(tmp_path))
    with pytest.raises(DataError, match='DATA.DATA_PATH is not set'):
        build_loader(make_config(''))


def test_bad_zip_inputs(folder, tmp_path):
    zipped = tmp_path / 'zipped'
    zip_dataset(folder, zipped)
    (zipped / 'val_map.txt').write_text('cat/0.png 0\n')
    with pytest.raises(DataError, match='val_map.txt line 1'):
        build_loader(make_config(zipped, zip=True))
    (zipped / 'val_map.txt').write_text('cat/99.png\t0\n')
    with pytest.raises(DataError, match='cat/99.png, which is not in'):
        build_loader(make_config(zipped, zip=True))
    os.remove(zipped / 'val.zip')
    with pytest.raises(DataError, match='zip file not found'):
        build_loader(make_config(zipped, zip=True))


def test_class_mismatch_and_too_few_images(tmp_path):
    write_image_folder(tmp_path)
    with pytest.raises(DataError, match='more than MODEL.NUM_CLASSES 2'):
        build_loader(make_config(tmp_path, 'MODEL.NUM_CLASSES', '2'))
    with pytest.raises(DataError, match='larger than the 18 training images'):
        build_loader(make_config(tmp_path, 'DATA.BATCH_SIZE', '20'))
    with pytest.raises(DataError, match='even DATA.BATCH_SIZE'):
        build_mixup(make_config(tmp_path, 'DATA.BATCH_SIZE', '3'), 3)
    os.rename(tmp_path / 'val' / 'fox', tmp_path / 'val' / 'wolf')
    with pytest.raises(DataError, match='class folders .* differ'):
        build_loader(make_config(tmp_path))


def test_mixup_off_and_hflip_off(folder):
    config = make_config(folder, 'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0', 'AUG.HFLIP', '0.0')
    loader_train, _, class_names = build_loader(config)
    assert build_mixup(config, len(class_names)) is None
    names = [type(t).__name__ for t in loader_train.dataset.dataset.dataset.transform.transforms]
    assert 'RandomHorizontalFlip' not in names and 'RandomErasing' in names


def test_digits_dataset_is_written_and_loaded(tmp_path):
    config = make_config('', 'DATA.DATASET', 'digits', 'DATA.DATA_PATH', str(tmp_path), eval=True)
    _, loader_val, class_names = build_loader(config)
    assert len(loader_val.dataset) == 360 and class_names == [str(digit) for digit in range(10)]


def test_the_default_randaugment_runs_at_its_top_magnitude():
    """AUG.AUTO_AUGMENT's 'rand-m9-mstd0.5-inc1' draws magnitudes around 9, clipped at 10, where timm
    posterizes to 0 bits (a black image): every op of the policy must run there with the installed
    Pillow (Pillow 13 refuses 0 bits, which crashed a training run at a random sample)."""
    from timm.data.auto_augment import rand_augment_transform
    policy = rand_augment_transform('rand-m10-n1-inc1', {'img_mean': (124, 116, 104)})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    for op in policy.ops:
        op.prob = 1.0
        assert op(image).size == image.size, op.name
    posterize = next(op for op in policy.ops if op.name == 'PosterizeIncreasing')
    assert np.asarray(posterize(image)).max() == 0  # 0 bits kept: what timm means at the top magnitude
