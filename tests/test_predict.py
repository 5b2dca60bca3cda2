"""predict.py as users run it: a training checkpoint of a tiny focal model (saved by utils.save_checkpoint, the
layout main.py writes), real image files of every awkward kind in a temp folder, the command in a subprocess
with a timeout; the features read back with safetensors; the attention a block keeps checked on models whose
attention is set by hand."""
import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from pycocotools.coco import COCO
from safetensors.torch import load_file
from torchvision.transforms.functional import pil_to_tensor

import predict
from config import get_config, with_classes
from data import UnreadableImages
from data.ade20k import eval_transform
from data.image_io import read_photo
from helpers import CLASSES, REPO, TIMM_NAME, TIMM_TINY_ARCH, TINY_KWARGS, subprocess_env, write_config
from models.attention_maps import attention_over_map, grad_cam, keep_attention, query_slot
from models.attention_tables import attention_tables, neighbour_key_positions
from models.focal_transformer import FocalTransformer
from tasks import build_task
from tasks.segmentation import predict as segment
from utils import TrainingState, save_checkpoint


def save_training_checkpoint(folder, edit=None, cfg=None, classes=CLASSES):
    """A checkpoint as main.py saves it, of the tiny model (TINY_CONFIG, CLASSES) or the task `cfg` names,
    `edit`ed first."""
    cfg = cfg or write_config(folder / 'tiny.yaml')
    config = with_classes(get_config(argparse.Namespace(cfg=cfg, output=str(folder))), classes)
    torch.manual_seed(0)
    model = build_task(config).build_model(config)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainingState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.),
                          torch.amp.GradScaler('cpu', enabled=False), UnreadableImages(0, 'cpu'), classes)
    os.makedirs(config.OUTPUT, exist_ok=True)
    return save_checkpoint(state, config, logging.getLogger('test_predict')), model.eval()


def write_odd_images(folder):
    """One image of each kind predict.py must read, in `folder` and a sub-folder, and one broken file."""
    rng = np.random.default_rng(0)
    (folder / 'more').mkdir(parents=True)
    colour = rng.integers(0, 255, (45, 70, 3), dtype=np.uint8)
    Image.fromarray(colour).save(folder / 'wide.jpg')
    Image.fromarray(colour[:, :, 0]).save(folder / 'grey.png')
    Image.fromarray(np.dstack([colour, colour[:, :, :1]])).save(folder / 'alpha.png')
    Image.fromarray(colour).convert('CMYK').save(folder / 'cmyk.jpg')
    Image.fromarray((rng.integers(0, 65535, (30, 20))).astype(np.uint16)).save(folder / 'more' / 'deep16.png')
    Image.fromarray(colour[:7, :9]).save(folder / 'more' / 'tiny.bmp')
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: shown turned 90 degrees clockwise
    Image.fromarray(colour).save(folder / 'rotated.jpg', exif=exif)
    (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    return sorted(str(p) for p in folder.rglob('*') if p.is_file() and p.name != 'broken.png')


def run_predict(tmp_path, *args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(REPO, 'predict.py'), *map(str, args)], cwd=REPO,
                          env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp('predict')
    checkpoint, model = save_training_checkpoint(folder)
    return checkpoint, model, write_odd_images(folder / 'images'), folder


def test_read_photo_odd_formats(tmp_path):
    paths = write_odd_images(tmp_path)
    for path in paths:
        assert read_photo(path).mode == 'RGB', path
    assert read_photo(tmp_path / 'rotated.jpg').size == (45, 70)  # EXIF orientation applied: turned upright
    deep = np.asarray(read_photo(tmp_path / 'more' / 'deep16.png'))
    assert deep.max() > 200 and deep.min() < 50  # scaled from 16 bits, not clipped to white


def test_predict_folder_outputs_and_features(trained, tmp_path):
    checkpoint, model, paths, folder = trained
    result = run_predict(tmp_path, '--resume', checkpoint, folder / 'images', '--topk', 2, '--batch-size', 3,
                         '--output', tmp_path / 'preds.json', '--features', tmp_path / 'f.safetensors', '--stage-maps')
    assert result.returncode == predict.EXIT_SKIPPED, result.stderr
    skipped = [line for line in result.stderr.splitlines() if line.startswith('skipped:')]
    assert len(skipped) == 1 and 'broken.png' in skipped[0]
    assert '[8/8] images' in result.stderr
    saved = json.loads((tmp_path / 'preds.json').read_text())
    assert [entry['file'] for entry in saved] == paths
    features = load_file(tmp_path / 'f.safetensors')
    transform = predict.prediction_transform(get_config(argparse.Namespace(cfg=str(folder / 'tiny.yaml'))))
    images = torch.stack([transform(read_photo(path)) for path in paths])
    with torch.no_grad():
        final, maps = model.forward_intermediates(images)
        pooled = model.forward_head(final, pre_logits=True)
        expected = model.head(pooled).softmax(-1).topk(2)
    for i, (path, entry) in enumerate(zip(paths, saved)):
        assert [p['class'] for p in entry['predictions']] == [CLASSES[c] for c in expected.indices[i]]
        assert [p['probability'] for p in entry['predictions']] == pytest.approx(expected.values[i].tolist(), abs=1e-5)
        assert f'{path}: {CLASSES[expected.indices[i, 0]]} (' in result.stdout
        torch.testing.assert_close(features[path], pooled[i], atol=1e-5, rtol=1e-4)
        for stage, stage_map in enumerate(maps):
            torch.testing.assert_close(features[f'{path}/stage{stage}'], stage_map[i], atol=1e-5, rtol=1e-4)
    assert len(features) == len(paths) * (1 + len(maps))


def uniform_block(model):
    """Block 0.0 attends uniformly over its valid key slots: q and k projections and every bias table zero."""
    attn = model.layers[0].blocks[0].attn
    dim = attn.dim
    attn.qkv.weight[:2 * dim].zero_()
    attn.qkv.bias[:2 * dim].zero_()
    for table in [attn.relative_position_bias_table, attn.relative_position_bias_table_to_neighbors,
                  *attn.relative_position_bias_table_to_windows]:
        table.zero_()


def valid_slots(block, padded_size, window):
    """The key slots of `window` that the mask leaves open (no shift in these blocks: one mask row)."""
    positions = neighbour_key_positions(block.window_size, block.expand_size) if block.expand_size else None
    _, _, mask = attention_tables(padded_size, block.window_size, block.shift_size, block.focal_window,
                                  block.pooled_levels, positions, torch.device('cpu'))
    return mask[window, 0] == 0


def test_attention_figure_draws_the_forwards_weights(tmp_path):
    write_config(tmp_path / 'tiny.yaml')
    (tmp_path / 'two_heads.yaml').write_text(f'BASE: [tiny.yaml]\nMODEL:\n  FOCAL:\n    NUM_HEADS: [2, 2]\n')
    checkpoint, model = save_training_checkpoint(tmp_path, uniform_block, str(tmp_path / 'two_heads.yaml'))
    Image.fromarray(np.full((64, 48, 3), 128, np.uint8)).save(tmp_path / 'plain.png')
    result = run_predict(tmp_path, '--resume', checkpoint, tmp_path / 'plain.png', '--attention', tmp_path / 'maps',
                         '--point', '30,20', '--block', '0.0')
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / 'maps' / 'plain.png') as figure:
        heads = model.layers[0].blocks[0].attn.num_heads
        assert figure.width == (3 + heads) * 192  # input, heads' mean, each head, Grad-CAM; 32 px drawn at 192
    drawn = load_file(tmp_path / 'maps' / 'plain.safetensors')
    query = drawn['query_probabilities']  # (heads, key slots)
    block = model.layers[0].blocks[0]
    # 48x64 resized to the 32 px input: pixel (30, 20) -> (20, 10) -> token (2, 5) of the 8x8 map, window 1
    # (whose pooled cells above the grid are masked; unresized, the point would fall in window 3)
    open_slots = valid_slots(block, (8, 8), window=1)
    assert query.shape[-1] == open_slots.numel()
    torch.testing.assert_close(query.sum(-1), torch.ones(heads))
    torch.testing.assert_close(query[:, open_slots], torch.full((heads, int(open_slots.sum())), 1 / open_slots.sum()))
    assert (query[:, ~open_slots] == 0).all()
    torch.testing.assert_close(drawn['map'].sum((1, 2)), torch.ones(heads))  # no padding at 8x8: all on the map
    assert drawn['grad_cam'].shape == (4, 4) and drawn['grad_cam'].max() <= 1  # the last map, 4x4 at 32 px


@pytest.mark.parametrize('shift', [0, 2], ids=['unshifted', 'shifted'])
def test_kept_attention_follows_the_bias_to_the_query_token(shift):
    """A bias table that makes every query attend to its own token: the kept probabilities are one there,
    and the map drawn from them is one on the query's token, through the shift's roll and back."""
    torch.manual_seed(0)
    model = FocalTransformer(**dict(TINY_KWARGS, depths=[2, 1], use_shift=shift > 0)).eval()
    block = model.layers[0].blocks[1]
    assert block.shift_size == shift
    with torch.no_grad():
        table = block.attn.relative_position_bias_table
        table.zero_()
        ws = block.window_size
        table[(ws - 1) * (2 * ws - 1) + (ws - 1)] = 40.  # relative offset (0, 0): the query's own token
        images = torch.randn(2, 3, 32, 32)
        reference = model(images)
        with keep_attention(model, 0, 1) as capture:
            kept_output = model(images)
            for row, col in [(0, 0), (3, 5), (7, 7)]:
                window, query = query_slot(block, capture.kept, row, col)
                assert capture.kept.probabilities[1, window, :, query, query].min() > 0.99
                painted = attention_over_map(capture, 1, (row, col))
                assert painted[:, row, col].min() > 0.99
            mean = attention_over_map(capture, 0)
    torch.testing.assert_close(kept_output, reference)  # keeping the attention changes nothing computed
    torch.testing.assert_close(mean.sum((1, 2)), torch.ones(block.num_heads))
    # each image's own attention (block 0.0 keeps its random initialisation: images attend differently)
    with torch.no_grad(), keep_attention(model, 0, 0) as capture:
        model(images)
        together = capture.kept.probabilities
        model(images[1:])
        torch.testing.assert_close(together[1:], capture.kept.probabilities)
        assert not torch.allclose(together[0], together[1])


def test_grad_cam_weighs_the_last_map_by_the_class_gradient():
    """Grad-CAM against its definition, computed apart through the model's own forward (a hook on the
    last stage's last block): the last map's channels weighed by their mean gradient of the class score,
    summed, ReLU'd, scaled to a maximum of 1. Two classes whose scores are each other's negatives give
    maps that never overlap: each is positive only where the other's weighted sum is negative."""
    torch.manual_seed(0)
    model = FocalTransformer(**TINY_KWARGS).eval()
    with torch.no_grad():
        model.head.weight[1] = -model.head.weight[0]
    images, classes = torch.randn(2, 3, 64, 64), torch.tensor([2, 0])
    cams = grad_cam(model, images, classes)

    kept = {}
    hook = model.layers[-1].blocks[-1].register_forward_hook(lambda module, inputs, output: kept.update(map=output))
    try:
        scores = model(images).gather(1, classes[:, None]).sum()
    finally:
        hook.remove()
    last_map = kept['map']  # (B, H, W, C): 8x8 at 64 px
    gradient, = torch.autograd.grad(scores, last_map)
    expected = (last_map * gradient.mean((1, 2), keepdim=True)).sum(-1).clamp(min=0).detach()
    expected = expected / expected.flatten(1).amax(1)[:, None, None]
    assert cams.shape == (2, 8, 8)
    torch.testing.assert_close(cams, expected)

    first, second = (grad_cam(model, images, torch.tensor([label, label])) for label in (0, 1))
    assert (first * second == 0).all()
    for cam in (first, second):
        assert torch.equal(cam.flatten(1).amax(1), torch.ones(2))

    # a released layout at 32 px ends on a 1x1 map, which has nothing to locate: the 2x2 map before it
    four_stages = timm.create_model(TIMM_NAME, **TIMM_TINY_ARCH).eval()
    assert grad_cam(four_stages, images[:, :, :32, :32], classes).shape == (2, 2, 2)


@pytest.mark.parametrize('case, message', [
    ('empty folder', 'no images in'),
    ('topk', '--topk 4 exceeds the 3 classes'),
    ('point', 'lies outside'),
    ('no config', 'saved no config'),
    ('block', 'block 5.0 does not exist'),
    ('unwritable', 'cannot write'),
    ('missing', 'no such file or folder'),
])
def test_bad_input_is_one_line(trained, tmp_path, capsys, case, message):
    checkpoint, model, paths, _ = trained
    (tmp_path / 'empty').mkdir()
    torch.save(model.state_dict(), tmp_path / 'weights.pth')
    argv = {'empty folder': ['--resume', checkpoint, str(tmp_path / 'empty')],
            'topk': ['--resume', checkpoint, paths[0], '--topk', '4'],
            'point': ['--resume', checkpoint, paths[0], '--attention', str(tmp_path / 'maps'), '--point', '500,3'],
            'no config': ['--resume', str(tmp_path / 'weights.pth'), paths[0]],
            'block': ['--resume', checkpoint, paths[0], '--attention', str(tmp_path / 'maps'), '--block', '5.0'],
            'unwritable': ['--resume', checkpoint, paths[0], '--output', str(tmp_path / 'no' / 'such' / 'p.csv')],
            'missing': ['--resume', checkpoint, paths[0], str(tmp_path / 'gone.png')],
            }[case]
    assert predict.cli(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith('error: ') and message in error[-1], error


def test_released_weights_with_cfg_get_imagenet_names(trained, tmp_path, capsys):
    """Weights without a saved config take the model from --cfg; a 1000-class head gets ImageNet-1K's names."""
    _, _, paths, folder = trained
    (tmp_path / 'imagenet.yaml').write_text(f'BASE: [{folder / "tiny.yaml"}]\nMODEL:\n  NUM_CLASSES: 1000\n')
    model = FocalTransformer(**dict(TINY_KWARGS, num_classes=1000))
    with torch.no_grad():
        model.head.bias[1] = 100.  # every image: class 1, ImageNet's goldfish
    torch.save(model.state_dict(), tmp_path / 'released.pth')
    assert predict.cli(['--cfg', str(tmp_path / 'imagenet.yaml'), '--resume', str(tmp_path / 'released.pth'),
                        paths[0], '--topk', '1']) == 0
    assert f'{paths[0]}: goldfish, Carassius auratus (1.000)' in capsys.readouterr().out


def test_pretrained_adapts_to_the_cfg_model(trained, tmp_path, capsys):
    """--pretrained loads the weights into the --cfg model of another window (its bias tables resized);
    the CSV has a row per image and rank."""
    checkpoint, _, paths, folder = trained
    (tmp_path / 'window.yaml').write_text(f'BASE: [{folder / "tiny.yaml"}]\nMODEL:\n  FOCAL:\n    WINDOW_SIZE: 2\n')
    assert predict.cli(['--cfg', str(tmp_path / 'window.yaml'), '--pretrained', checkpoint, *paths[:2],
                        '--output', str(tmp_path / 'preds.csv')]) == 0
    rows = (tmp_path / 'preds.csv').read_text().splitlines()
    assert rows[0] == 'file,rank,class,probability' and len(rows) == 1 + 2 * len(CLASSES)
    assert [row.split(',')[:2] for row in rows[1:4]] == [[paths[0], '1'], [paths[0], '2'], [paths[0], '3']]
    assert all(row.split(',')[2] in CLASSES for row in rows[1:])


@pytest.mark.parametrize('cfg, classes', [
    ('configs/detection/mask_rcnn_focal_micro_digits.yaml', ['background', 'zero', 'one']),
    ('configs/segmentation/upernet_focal_micro_digits.yaml', ['ground', 'zero', 'one']),
], ids=['detector', 'segmenter'])
def test_dense_checkpoint_draws_and_writes_coco_json(tmp_path, cfg, classes):
    """A detector's or segmenter's checkpoint: each image drawn, the predictions COCO-style JSON that
    pycocotools reads (every mask an RLE of the image's size; a segmenter's one per class, its pixels
    exactly), the broken file skipped (exit 3)."""
    checkpoint, model = save_training_checkpoint(tmp_path, cfg=os.path.join(REPO, cfg), classes=classes)
    paths = write_odd_images(tmp_path / 'images')[:3]
    argv = ['--resume', checkpoint, *paths, str(tmp_path / 'images' / 'broken.png'), '--draw', str(tmp_path / 'drawn'),
            '--output', str(tmp_path / 'preds.json'), '--threshold', '0']
    assert predict.cli(argv) == predict.EXIT_SKIPPED
    assert len(os.listdir(tmp_path / 'drawn')) == len(paths)
    coco = COCO(str(tmp_path / 'preds.json'))
    assert [coco.imgs[i]['file_name'] for i in sorted(coco.imgs)] == paths
    assert coco.dataset['annotations'] and all('segmentation' in a for a in coco.dataset['annotations'])
    for annotation in coco.dataset['annotations']:
        image = coco.imgs[annotation['image_id']]
        assert coco.annToMask(annotation).shape == (image['height'], image['width'])
        assert 0 < annotation['category_id'] < len(classes) or 'segmentation' in cfg  # a detector's 0: background
    if 'segmentation' in cfg:  # the model's class map, pixel for pixel (its random initialisation: several classes)
        config = get_config(argparse.Namespace(cfg=os.path.join(REPO, cfg)))
        for image_id, path in enumerate(paths, 1):
            picture = eval_transform()(pil_to_tensor(read_photo(path)))[None]
            with torch.no_grad():
                expected = segment(model, picture, config.DATA.SEG_SCALE, [1.], False, contextlib.nullcontext)
            expected = expected[0].argmax(0).numpy()
            found = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
            assert sorted(a['category_id'] for a in found) == np.unique(expected).tolist()
            for annotation in found:
                assert (coco.annToMask(annotation) == (expected == annotation['category_id'])).all()
        assert len(coco.dataset['annotations']) > len(paths)
