"""ImageNet-22K: the synset-folder data set and its index (data/imagenet22k.py), the class orders and the
22K -> 1K head mapping (models/class_orders.py), the 22K recipes."""
import hashlib
import argparse
import logging
import multiprocessing
import os
import re
import time
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import ImageNetInfo

import data.imagenet22k
from config import get_config, with_classes
from data.bad_samples import ReplaceUnreadable
from data.image_io import DataError
from data.build import build_loader
from data.imagenet22k import ImageNet22K, open_index
from helpers import REPO, assert_ok, run_dir, run_main, write_config, zip_dataset
from models import build_model
from models.checkpoint import CheckpointError
from models.class_orders import ORDERS, map_head, order_synsets, orders_of_rows, source_synsets
from utils import load_pretrained

IMAGENET_1K = ImageNetInfo('imagenet-1k').label_names()
FALL11 = ImageNetInfo('imagenet-22k').label_names()
# A 22K-style folder: 8 of ImageNet-1K's synsets and 16 that only 22K has.
SYNSETS = sorted(IMAGENET_1K[::125] + [s for s in FALL11 if s not in set(IMAGENET_1K)][::1300][:16])


def write_synset_folder(root, synsets=SYNSETS, per_class=6, size=16, seed=0):
    """One folder of `per_class` PNGs per synset of SYNSETS, each synset its own colour under noise
    (the same colour in every folder written)."""
    rng = np.random.default_rng(seed)
    for synset in synsets:
        folder = os.path.join(root, synset)
        os.makedirs(folder, exist_ok=True)
        number = SYNSETS.index(synset)
        colour = np.array([(number * 37) % 256, (number * 91) % 256, (number * 53) % 256])
        for i in range(per_class):
            image = colour + rng.integers(-20, 20, (size, size, 3))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f'{synset}_{i}.png'))
    return str(root)


def touch_later(path):
    """Write a new image into `path`'s folder a moment after whatever came before (folder times have the
    kernel clock's few-millisecond resolution)."""
    time.sleep(0.02)
    Image.new('RGB', (16, 16)).save(path)


@pytest.fixture
def folder(tmp_path):
    return write_synset_folder(tmp_path / 'fall11')


def loader_config(data_path, tmp_path, opts=()):
    return get_config(argparse.Namespace(cfg=os.path.join(REPO, 'configs', 'focal_tiny_patch4_window7_224_22k.yaml'),
                                         data_path=str(data_path), opts=[
                                             'DATA.INDEX_PATH', str(tmp_path / 'index'), 'DATA.IMG_SIZE', '32',
                                             'DATA.NUM_WORKERS', '0', 'DATA.HOLDOUT_FRACTION', '0.25', *opts]))


# ---------------------------------------------------------------- the index

def test_index_is_built_once_reused_and_lists_again_only_what_changed(folder, tmp_path, monkeypatch):
    index_dir = str(tmp_path / 'index')
    index, what = open_index(folder, index_dir, is_writer=True)
    assert what == 'built' and index.synsets == SYNSETS and len(index) == 6 * len(SYNSETS)
    assert index.relative_path(0) == f'{SYNSETS[0]}/{SYNSETS[0]}_0.png'
    assert sorted(os.listdir(index_dir)) == [os.path.basename(data.imagenet22k.index_file(folder, index_dir)),
                                             os.path.basename(data.imagenet22k.index_file(folder, index_dir)) + '.lock']

    listed = []
    real_list = data.imagenet22k._list_synset
    monkeypatch.setattr(data.imagenet22k, '_list_synset', lambda root, synset: listed.append(synset) or
                        real_list(root, synset))
    again, what = open_index(folder, index_dir, is_writer=True)
    assert what == 'reused' and listed == []
    assert again.synsets == index.synsets and np.array_equal(again.hashes, index.hashes)

    touch_later(os.path.join(folder, SYNSETS[3], 'added.png'))
    changed, what = open_index(folder, index_dir, is_writer=True)
    assert what == 'rebuilt: 0 synset folders added, 0 removed, 1 changed' and listed == [SYNSETS[3]]
    assert len(changed) == len(index) + 1
    assert f'{SYNSETS[3]}/added.png' in {changed.relative_path(i) for i in range(len(changed))}
    # the folders taken from the old index keep their files, hashes and labels
    old = {index.relative_path(i): (index.hashes[i], index.labels[i]) for i in range(len(index))}
    new = {changed.relative_path(i): (changed.hashes[i], changed.labels[i]) for i in range(len(changed))}
    assert all(new[path] == value for path, value in old.items())

    listed.clear()
    extra = FALL11[5]
    time.sleep(0.02)
    with open(os.path.join(folder, 'README.txt'), 'w') as f:  # a file in the root is passed over
        f.write('fall11')
    os.makedirs(os.path.join(folder, extra))
    Image.new('RGB', (16, 16)).save(os.path.join(folder, extra, 'a.png'))
    os.rename(os.path.join(folder, SYNSETS[0]), os.path.join(tmp_path, 'moved_out'))
    grown, what = open_index(folder, index_dir, is_writer=True)
    assert what == 'rebuilt: 1 synset folders added, 1 removed, 0 changed' and listed == [extra]
    assert grown.synsets == sorted(SYNSETS[1:] + [extra])


def test_a_damaged_index_is_rebuilt_and_another_root_has_its_own(folder, tmp_path):
    index_dir = str(tmp_path / 'index')
    open_index(folder, index_dir, is_writer=True)
    with open(data.imagenet22k.index_file(folder, index_dir), 'r+b') as f:
        f.truncate(100)
    index, what = open_index(folder, index_dir, is_writer=True)
    assert what == 'built' and index.synsets == SYNSETS
    other = write_synset_folder(tmp_path / 'other', SYNSETS[:2], per_class=1)
    assert open_index(other, index_dir, is_writer=True)[1] == 'built'
    assert open_index(folder, index_dir, is_writer=True)[1] == 'reused'


def held_out(folder, index_dir, is_writer, results):
    index, what = open_index(folder, index_dir, is_writer=is_writer, poll_interval=0.05)
    val = ImageNet22K(index, 'val', 0.25)
    results.put((what, [val.relative_path(i) for i in range(len(val))]))


def test_the_held_out_split_is_the_same_in_every_process_and_at_every_restart(folder, tmp_path):
    """Rank 0 writes the index while rank 1 waits for it; a restart reads it; all three processes hold out
    the same images, chosen by their path alone."""
    index_dir = str(tmp_path / 'index')
    fork = multiprocessing.get_context('fork')  # separate processes, without a second interpreter start
    results = fork.Queue()

    def run(*roles):
        processes = [fork.Process(target=held_out, args=(folder, index_dir, role == 'writer', results))
                     for role in roles]
        for process in processes:
            process.start()
        found = [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(timeout=60)
            assert process.exitcode == 0
        return found

    first = run('reader', 'writer')
    restart = run('writer')
    assert sorted(what for what, _ in first) == ['built', 'reused'] and restart[0][0] == 'reused'
    assert first[0][1] == first[1][1] == restart[0][1]
    assert 0 < len(restart[0][1]) < 6 * len(SYNSETS)


def test_train_and_val_partition_the_images_by_path_hash(folder, tmp_path):
    index, _ = open_index(folder, str(tmp_path / 'index'), is_writer=True)
    train, val = ImageNet22K(index, 'train', 0.25), ImageNet22K(index, 'val', 0.25)
    train_paths = {train.relative_path(i) for i in range(len(train))}
    val_paths = {val.relative_path(i) for i in range(len(val))}
    assert not train_paths & val_paths and len(train_paths | val_paths) == len(index)
    for path in val_paths:
        digest = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=4).digest(), 'big')
        assert digest < 0.25 * 2 ** 32
    image, label = val[0]
    assert image.size == (16, 16) and SYNSETS[label] == val.relative_path(0).split('/')[0]
    assert train.classes == val.classes == SYNSETS


def test_an_unreadable_image_follows_the_bad_sample_policy(folder, tmp_path):
    broken = os.path.join(folder, SYNSETS[1], f'{SYNSETS[1]}_0.png')
    with open(broken, 'wb') as f:
        f.write(b'not an image')
    index, _ = open_index(folder, str(tmp_path / 'index'), is_writer=True)
    dataset = ImageNet22K(index, 'train', 0.01)
    item = next(i for i in range(len(dataset)) if os.path.join(folder, dataset.relative_path(i)) == broken)
    with pytest.raises(DataError) as error:
        dataset[item]
    assert error.value.path == broken and str(error.value).startswith(f'cannot read image {broken}')
    _, label, replaced = ReplaceUnreadable(dataset, 1)[item]
    assert [path for path, _ in replaced] == [broken] and label == dataset[item + 1][1]


@pytest.mark.parametrize('name, problem', [
    ('train', 'is not a WordNet synset folder'),
    ('n99999999', 'is not a WordNet synset folder'),
])
def test_a_folder_that_is_not_a_synset_is_one_line_naming_it(folder, tmp_path, name, problem):
    os.makedirs(os.path.join(folder, name))
    with pytest.raises(DataError) as error:
        open_index(folder, str(tmp_path / 'index'), is_writer=True)
    message = str(error.value)
    assert '\n' not in message and message.startswith(f'{os.path.join(os.path.realpath(folder), name)} {problem}')


def test_other_bad_input_is_one_line(folder, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(DataError, match=f'^no synset folders in {empty}'):
        open_index(str(empty), str(tmp_path / 'index'), is_writer=True)
    with pytest.raises(DataError, match='waited 0 s for rank 0 to write the ImageNet-22K index'):
        open_index(folder, str(tmp_path / 'index'), is_writer=False, timeout=0.0, poll_interval=0.01)
    index, _ = open_index(folder, str(tmp_path / 'index'), is_writer=True)
    with pytest.raises(DataError, match='DATA.HOLDOUT_FRACTION must lie between 0 and 1'):
        ImageNet22K(index, 'val', 0.0)
    with pytest.raises(DataError, match=r'no image of .* falls in its val split'):
        ImageNet22K(index, 'val', 1e-9)


def test_zip_layout_labels_are_named_by_the_synset_folders_of_their_images(tmp_path):
    """ImageNet-22K zipped as ImageNet-1K is (train.zip, val.zip and their map files): the labels' names are
    the synset folders of their images; a label whose images are not in one synset folder is one line."""
    for split in ('train', 'val'):
        write_synset_folder(tmp_path / 'folders' / split, SYNSETS[:4], per_class=2)
    zipped = zip_dataset(str(tmp_path / 'folders'), str(tmp_path / 'zipped'))
    config = loader_config(zipped, tmp_path, ['DATA.ZIP_MODE', 'True', 'DATA.BATCH_SIZE', '2'])
    assert build_loader(config)[2] == SYNSETS[:4]
    map_file = os.path.join(zipped, 'val_map.txt')
    with open(map_file) as f:
        lines = f.read()
    with open(map_file, 'w') as f:
        f.write(lines.replace('\t1\n', '\t3\n', 1))  # label 3's images in two synset folders
    with pytest.raises(DataError, match=f"^{map_file}: label 3 is not the images of one WordNet synset folder"):
        build_loader(config)


# ---------------------------------------------------------------- class orders and the 22K -> 1K head

def test_the_class_orders_are_timms_lists():
    assert [len(order_synsets(order)) for order in ORDERS] == [21841, 21843, 21842, 1000]
    assert list(order_synsets('imagenet-22k')) == sorted(FALL11)
    ms = order_synsets('imagenet-22k-ms')
    assert list(ms[:1000]) == IMAGENET_1K == sorted(IMAGENET_1K) and list(ms[1000:]) == sorted(ms[1000:])
    google = order_synsets('imagenet-21k-goog')
    swin = order_synsets('imagenet-21k-goog', 21841)
    assert (swin[9205], swin[15027]) == (google[21841], google[21842])
    assert swin[:9205] == google[:9205] and swin[21840] == google[21840]
    assert orders_of_rows(21841) == ['imagenet-22k', 'imagenet-21k-goog']
    assert [orders_of_rows(rows) for rows in (21842, 21843, 1000, 5)] == [['imagenet-22k-ms'], ['imagenet-21k-goog'],
                                                                           ['imagenet-1k'], []]


# Lines of Swin's data/map22kto1k.txt (ImageNet-1K class: its row in Swin's 22K head): the first and
# last classes and two where Google's order and the sorted fall11 differ.
SWIN_MAP22KTO1K = {0: 359, 1: 368, 2: 460, 718: 9212, 719: 9221, 998: 21369, 999: 21817}
TEDDY_BEAR = 850  # n04399382: in no 22K list but imagenet-22k-ms


# (order, rows of the head, how it is named: 'order' = MODEL.PRETRAINED_CLASS_ORDER, 'rows' = by its size)
HEADS = [('imagenet-22k', 21841, 'order'), ('imagenet-21k-goog', 21841, 'order'), ('imagenet-21k-goog', 21843, 'rows'),
         ('imagenet-22k-ms', 21842, 'rows'), ('imagenet-1k', 1000, 'rows')]


@pytest.mark.parametrize('order, rows, named_by', HEADS)
def test_22k_to_1k_keeps_the_row_of_each_1k_synset_under_every_order(order, rows, named_by):
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(rows, 8, generator=generator), torch.randn(rows, generator=generator)
    fresh_weight, fresh_bias = torch.randn(1000, 8, generator=generator), torch.randn(1000, generator=generator)
    synsets, origin = source_synsets(rows, order=order if named_by == 'order' else '')
    assert origin == order
    mapped = map_head(weight, bias, synsets, IMAGENET_1K, fresh_weight, fresh_bias, origin)
    listed = order_synsets(order, rows)
    for target, synset in enumerate(IMAGENET_1K):
        if synset in listed:
            assert torch.equal(mapped.weight[target], weight[listed.index(synset)]), synset
            assert torch.equal(mapped.bias[target], bias[listed.index(synset)]), synset
        else:
            assert torch.equal(mapped.weight[target], fresh_weight[target])
            assert mapped.bias[target] == fresh_bias[target]
    missing = [] if order in ('imagenet-22k-ms', 'imagenet-1k') else [IMAGENET_1K[TEDDY_BEAR]]
    assert mapped.missing == missing and mapped.kept == 1000 - len(missing)
    assert mapped.summary().startswith(f'head: {mapped.kept} of 1000 class rows kept by synset, from {order}')
    if (order, rows) == ('imagenet-21k-goog', 21841):  # Swin's 22K heads
        for target, row in SWIN_MAP22KTO1K.items():
            assert torch.equal(mapped.weight[target], weight[row])


def test_a_head_with_class_names_is_mapped_by_them():
    names = SYNSETS[::-1]
    weight, bias = torch.arange(len(names) * 2.).view(-1, 2), torch.arange(len(names) * 1.)
    synsets, origin = source_synsets(len(names), class_names=names)
    target = [SYNSETS[5], IMAGENET_1K[1], SYNSETS[0]]
    mapped = map_head(weight, bias, synsets, target, torch.zeros(3, 2), torch.zeros(3), origin)
    assert origin == 'the class names it carries' and mapped.kept == 2 and mapped.missing == [IMAGENET_1K[1]]
    assert mapped.bias.tolist() == [len(names) - 1 - 5, 0., len(names) - 1]


def test_bad_heads_are_one_line_naming_the_file():
    with pytest.raises(CheckpointError, match='^ckpt.pth: its head of 21841 rows carries no class names and fits '
                                              'the orders imagenet-22k and imagenet-21k-goog: set MODEL.PRETRAINED'):
        source_synsets(21841, source='ckpt.pth')
    with pytest.raises(CheckpointError, match='^ckpt.pth: its head of 12345 rows carries no class names and matches '
                                              r'no known class order \(imagenet-22k 21841'):
        source_synsets(12345, source='ckpt.pth')
    with pytest.raises(CheckpointError, match="^ckpt.pth: its head of 21842 rows does not fit MODEL.PRETRAINED_CLASS_"
                                              "ORDER: class order 'imagenet-22k' has 21841 classes, not 21842"):
        source_synsets(21842, order='imagenet-22k', source='ckpt.pth')
    with pytest.raises(CheckpointError, match="MODEL.PRETRAINED_CLASS_ORDER: unknown class order 'in22k'"):
        source_synsets(21841, order='in22k', source='ckpt.pth')
    with pytest.raises(CheckpointError, match='^ckpt.pth names 3 classes for a head of 4 rows'):
        source_synsets(4, class_names=SYNSETS[:3], source='ckpt.pth')
    digits = [str(digit) for digit in range(10)]
    with pytest.raises(CheckpointError, match=r"^ckpt.pth: none of the model's 10 classes \(0, 1, 2, ...\) is among "
                                              r'the 1000 classes of its head \(imagenet-1k\)'):
        map_head(torch.zeros(1000, 2), torch.zeros(1000), IMAGENET_1K, digits, torch.zeros(10, 2), torch.zeros(10),
                 'imagenet-1k', file='ckpt.pth')


# ---------------------------------------------------------------- recipes

def flat(node, prefix=''):
    items = {}
    for key, value in node.items():
        items.update(flat(value, f'{prefix}{key}.') if isinstance(value, dict) else {prefix + key: value})
    return items


def recipe(name):
    return flat(get_config(argparse.Namespace(cfg=os.path.join(REPO, 'configs', name))))


# Swin's drop path per size (configs/swin/swin_*_22k.yaml and *_22kto1k_finetune.yaml: the same in both)
SWIN_DROP_PATH = {'tiny': 0.1, 'small': 0.2, 'base': 0.2, 'large': 0.2}


@pytest.mark.parametrize('size', sorted(SWIN_DROP_PATH))
def test_22k_recipes_are_the_models_config_with_swins_schedules(size):
    model = recipe(f'focal_{size}_patch4_window7_224.yaml')

    def changes(name):
        config = recipe(name)
        assert config.keys() == model.keys()
        return {key: value for key, value in config.items() if model[key] != value and key != 'OUTPUT'}

    pretrain = f'focal_{size}_patch4_window7_224_22k'
    def unless_inherited(expected):
        return {key: value for key, value in expected.items() if model[key] != value}

    assert changes(pretrain + '.yaml') == unless_inherited({
        'DATA.DATASET': 'imagenet22k', 'MODEL.NAME': pretrain, 'MODEL.NUM_CLASSES': 21841,
        'MODEL.DROP_PATH_RATE': SWIN_DROP_PATH[size], 'TRAIN.EPOCHS': 90, 'TRAIN.WARMUP_EPOCHS': 5,
        'TRAIN.WEIGHT_DECAY': 0.05, 'TRAIN.BASE_LR': 1.25e-4, 'TRAIN.WARMUP_LR': 1.25e-7, 'TRAIN.MIN_LR': 1.25e-6})
    finetune = unless_inherited({
        'MODEL.DROP_PATH_RATE': SWIN_DROP_PATH[size], 'TRAIN.EPOCHS': 30, 'TRAIN.WARMUP_EPOCHS': 5,
        'TRAIN.WEIGHT_DECAY': 1e-8, 'TRAIN.BASE_LR': 2e-5, 'TRAIN.WARMUP_LR': 2e-8, 'TRAIN.MIN_LR': 2e-7})
    name_224 = f'focal_{size}_patch4_window7_224_22kto1k_finetune'
    assert changes(name_224 + '.yaml') == dict(finetune, **{'MODEL.NAME': name_224})
    name_384 = f'focal_{size}_patch4_window12_384_22kto1k_finetune'
    assert changes(name_384 + '.yaml') == dict(finetune, **{
        'MODEL.NAME': name_384, 'DATA.IMG_SIZE': 384, 'MODEL.FOCAL.WINDOW_SIZE': 12,
        'MODEL.FOCAL.EXPAND_SIZES': [6, 6, 6, 6], 'TEST.CROP': False})


# ---------------------------------------------------------------- through main.py

SUMMARY = re.compile(r' \* Acc@1 (\d+\.\d{3})')


def test_trains_on_a_22k_folder_and_its_checkpoint_scores_imagenet_1k_by_synset(tmp_path):
    """A micro model trains on a 22K-style folder through main.py and saves its synsets; --eval of that
    checkpoint on an ImageNet-1K-style val/ (the 1K synsets among them) scores the 22K head's rows of those
    synsets: the accuracy main.py reports is the 22K model's with its logits restricted to those classes."""
    folder = write_synset_folder(tmp_path / 'fall11', size=32)
    config = write_config(tmp_path / 'tiny.yaml')
    out = str(tmp_path / 'out')
    trained = run_main(tmp_path, ['--cfg', config, '--data-path', folder, '--output', out, '--dataset', 'imagenet22k',
                                  '--opts', 'TRAIN.EPOCHS', '1', 'DATA.HOLDOUT_FRACTION', '0.25',
                                  'DATA.INDEX_PATH', str(tmp_path / 'index')])
    assert_ok(trained)
    path = os.path.join(run_dir(out), 'ckpt_epoch_0.pth')
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint['classes'] == SYNSETS and checkpoint['model']['head.weight'].shape[0] == len(SYNSETS)

    in1k = [synset for synset in SYNSETS if synset in set(IMAGENET_1K)]
    for split in ('train', 'val'):
        write_synset_folder(tmp_path / 'imagenet' / split, in1k, per_class=3, size=32, seed=1)
    evaluated = run_main(tmp_path, ['--cfg', config, '--data-path', str(tmp_path / 'imagenet'), '--output', out,
                                    '--tag', 'in1k', '--eval', '--resume', path])
    assert_ok(evaluated)
    assert f'{path}: head: {len(in1k)} of {len(in1k)} class rows kept by synset, from the class names it carries' \
        in evaluated.stdout

    model = build_model(with_classes(get_config(argparse.Namespace(cfg=config)), SYNSETS)).eval()
    model.load_state_dict(checkpoint['model'])
    _, val_loader, names = build_loader(get_config(argparse.Namespace(
        cfg=config, data_path=str(tmp_path / 'imagenet'), eval=True)))
    assert names == in1k
    columns = [SYNSETS.index(synset) for synset in in1k]
    with torch.no_grad():
        hits = sum((model(images)[:, columns].argmax(1) == labels).sum().item() for images, labels in val_loader)
    assert SUMMARY.findall(evaluated.stdout) == [f'{100 * hits / len(val_loader.dataset):.3f}']


def pretrained_into_imagenet_1k(tmp_path, checkpoint, opts=()):
    """--pretrained `checkpoint` into a 1,000-class micro model whose data has ImageNet-1K's classes;
    returns (the model, what was logged)."""
    path = str(tmp_path / 'pretrained.pth')
    torch.save(checkpoint, path)
    config = with_classes(get_config(argparse.Namespace(cfg=write_config(tmp_path / 'tiny.yaml'), pretrained=path,
                                                        opts=['MODEL.NUM_CLASSES', '1000', *opts])), IMAGENET_1K)
    model = build_model(config)
    logger = logging.getLogger('test_imagenet22k')
    with mock.patch.object(logger, 'info') as info:
        load_pretrained(config, model, logger)
    return model, '\n'.join(str(call.args[0]) for call in info.call_args_list)


@pytest.mark.parametrize('order, rows', [('imagenet-21k-goog', 21841), ('imagenet-22k-ms', 21842)])
def test_pretrained_22k_head_without_names_keeps_the_1k_rows_of_its_order(tmp_path, order, rows):
    """A 22K checkpoint that carries no class names, as Swin's and FocalNet's: Swin's 21,841 rows need their
    order named (MODEL.PRETRAINED_CLASS_ORDER), 21,842 rows are imagenet-22k-ms by their number. Every
    1K synset's row is the 22K head's row of that synset, so the model predicts ImageNet-1K at once."""
    torch.manual_seed(0)
    source = build_model(get_config(argparse.Namespace(cfg=write_config(tmp_path / 'tiny.yaml'),
                                                       opts=['MODEL.NUM_CLASSES', str(rows)])))
    weights = {'model': source.state_dict()}
    named = ['MODEL.PRETRAINED_CLASS_ORDER', order] if rows == 21841 else []
    if named:
        with pytest.raises(CheckpointError, match='its head of 21841 rows carries no class names and fits the orders'):
            pretrained_into_imagenet_1k(tmp_path, weights)
    model, log = pretrained_into_imagenet_1k(tmp_path, weights, named)
    listed = order_synsets(order, rows)
    kept = [index for index, synset in enumerate(IMAGENET_1K) if synset in listed]
    for index in kept:
        row = listed.index(IMAGENET_1K[index])
        assert torch.equal(model.head.weight[index], source.head.weight[row])
        assert torch.equal(model.head.bias[index], source.head.bias[row])
    if rows == 21841:
        for index, row in SWIN_MAP22KTO1K.items():
            assert torch.equal(model.head.weight[index], source.head.weight[row])
    assert f'head: {len(kept)} of 1000 class rows kept by synset, from {order}' in log
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source.eval()(images)[:, [listed.index(IMAGENET_1K[index]) for index in kept]]
        torch.testing.assert_close(model.eval()(images)[:, kept], expected, rtol=0, atol=0)


def test_pretrained_head_of_other_classes_starts_fresh_or_is_one_line(tmp_path):
    """A head whose classes are not synsets (the digits demo's) starts fresh, as before; a head of synsets
    none of which is the data's is one line naming the file."""
    torch.manual_seed(0)
    source = build_model(get_config(argparse.Namespace(cfg=write_config(tmp_path / 'tiny.yaml'),
                                                       opts=['MODEL.NUM_CLASSES', '10'])))
    model, log = pretrained_into_imagenet_1k(tmp_path, {'model': source.state_dict(),
                                                        'classes': [str(digit) for digit in range(10)]})
    assert 'kept by synset' not in log and 'fresh 2 tensors' in log
    not_1k = [synset for synset in SYNSETS if synset not in set(IMAGENET_1K)][:10]
    with pytest.raises(CheckpointError, match=r"pretrained.pth: none of the model's 1000 classes \(n01440764, "):
        pretrained_into_imagenet_1k(tmp_path, {'model': source.state_dict(), 'classes': not_1k})
