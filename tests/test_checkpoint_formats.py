"""PaddleViT's .pdparams and safetensors files in every loader, and the conversion command (issue
23, parts 1-3). The .pdparams here are written as paddle.save writes them (a pickle of numpy
arrays, Linear weights as (in, out), its name table; a training checkpoint's tensors as
(variable name, array) pairs); PaddleViT's own files are tested in test_paddlevit.py."""
import argparse
import collections
import logging
import os
import pickle
import subprocess
import sys

import pytest
import safetensors
import safetensors.torch
import timm
import torch
from yacs.config import CfgNode

import convert_checkpoint
import main
import utils
from helpers import (REPO, TIMM_NAME, TIMM_TINY_ARCH, TINY_KWARGS, run_dir, write_config,
                     write_image_folder)
from models.backbone import load_pretrained, load_weights
from models.checkpoint import read_checkpoint
from models.detection import focal_fpn_backbone
from models.focal_transformer import FocalTransformer, checkpoint_filter_fn


def paddle_arrays(state_dict):
    """The numpy arrays paddle.save stores for a state dict: Linear weights as (in, out)."""
    return {key: (value.t() if key.endswith('.weight') and value.dim() == 2 else value).numpy()
            for key, value in state_dict.items()}


def write_pdparams(path, state_dict):
    """A released-style .pdparams: the arrays and paddle.save's structured-name table."""
    arrays = paddle_arrays(state_dict)
    table = {key: f'param_{index}' for index, key in enumerate(arrays)}
    path.write_bytes(pickle.dumps(dict(arrays, **{'StructuredToParameterName@@': table}), protocol=4))
    return path


def write_paddlevit_training_checkpoint(path, weights, ema_weights):
    """What PaddleViT's training writes: OrderedDicts of (variable name, array) pairs for the
    model and its EMA, the optimizer keyed by variable names, the position."""
    def pairs(state_dict):
        return collections.OrderedDict((key, (f'var_{index}', array)) for index, (key, array)
                                       in enumerate(paddle_arrays(state_dict).items()))
    checkpoint = {'model': pairs(weights), 'model_ema': pairs(ema_weights), 'epoch': 12,
                  'optimizer': {'var_0_moment1_0': ('var_0_moment1_0', paddle_arrays(weights)['norm.weight']),
                                'LR_Scheduler': {'last_epoch': 12, 'last_lr': 0.001}},
                  'lr_scheduler': {'last_epoch': 12, 'last_lr': 0.001}}
    path.write_bytes(pickle.dumps(checkpoint, protocol=4))
    return path


def random_weights(model, seed):
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
            for key, value in model.state_dict().items()}


def logits(model, weights):
    """`model`'s logits for a fixed batch of TINY_KWARGS images (32 px) with `weights` loaded strictly."""
    model.load_state_dict(checkpoint_filter_fn(weights, model), strict=True)
    model.eval()
    with torch.no_grad():
        return model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A tiny model's weights as .pth, .pdparams, a PaddleViT training checkpoint (EMA differing)
    and .safetensors, and the same for a timm-built released recipe (for the backbone loaders)."""
    root = tmp_path_factory.mktemp('formats')
    tiny = random_weights(FocalTransformer(**TINY_KWARGS), seed=1)
    ema = random_weights(FocalTransformer(**TINY_KWARGS), seed=2)
    recipe = random_weights(timm.create_model(TIMM_NAME, **TIMM_TINY_ARCH), seed=3)
    torch.save({'model': tiny}, root / 'tiny.pth')
    safetensors.torch.save_file(tiny, root / 'tiny.safetensors')
    safetensors.torch.save_file(recipe, root / 'recipe.safetensors')
    return {'root': root, 'tiny': tiny, 'ema': ema, 'recipe': recipe,
            'tiny.pth': root / 'tiny.pth', 'tiny.safetensors': root / 'tiny.safetensors',
            'tiny.pdparams': write_pdparams(root / 'tiny.pdparams', tiny),
            'training.pdparams': write_paddlevit_training_checkpoint(root / 'training.pdparams', tiny, ema),
            'recipe.pdparams': write_pdparams(root / 'recipe.pdparams', recipe),
            'recipe.safetensors': root / 'recipe.safetensors'}


@pytest.mark.parametrize('name, expected', [('tiny.pdparams', 'tiny'), ('training.pdparams', 'ema'),
                                            ('tiny.safetensors', 'tiny')])
def test_resume_and_pretrained_read_pdparams_and_safetensors(files, name, expected):
    """--resume (utils.load_model_weights) and --pretrained (utils.load_pretrained) from a path
    and a file:// URL; a PaddleViT training checkpoint gives its EMA weights."""
    logger = logging.getLogger('test_checkpoint_formats')
    for location in (str(files[name]), files[name].as_uri()):
        resumed, pretrained = FocalTransformer(**TINY_KWARGS), FocalTransformer(**TINY_KWARGS)
        load_weights(resumed, read_checkpoint(location), location, adapt=False)
        utils.load_pretrained(argparse.Namespace(MODEL=argparse.Namespace(PRETRAINED=location)), pretrained, logger)
        for key, value in files[expected].items():
            assert torch.equal(resumed.state_dict()[key], value), (location, key)
            assert torch.equal(pretrained.state_dict()[key], value), (location, key)


@pytest.mark.parametrize('extension', ['pdparams', 'safetensors'])
def test_timm_and_the_backbone_loaders_read_pdparams_and_safetensors(files, extension):
    path = files[f'recipe.{extension}']
    expected = files['recipe']
    for location in (str(path), path.as_uri()):
        classifier = timm.create_model(TIMM_NAME, pretrained=True, pretrained_cfg_overlay=dict(file=location),
                                       **TIMM_TINY_ARCH)
        features = timm.create_model(TIMM_NAME, features_only=True, **TIMM_TINY_ARCH)
        load_pretrained(features, location)
        fpn = focal_fpn_backbone(TIMM_NAME, pretrained=location, **TIMM_TINY_ARCH)
        for key, value in expected.items():
            assert torch.equal(classifier.state_dict()[key], value), key
            if not key.startswith(('head.', 'norm.')):
                assert torch.equal(features.model.state_dict()[key], value), key
        assert torch.equal(fpn.body.patch_embed.proj.weight, expected['patch_embed.proj.weight'])


def test_conversion_writes_the_released_layout_without_pickle(files, tmp_path, capsys):
    """A .pdparams, a PaddleViT training checkpoint and the original repository's training
    checkpoint (with its pickled CfgNode) convert into safetensors files that the safetensors
    library alone loads into the model strictly, with the source's logits."""
    model = FocalTransformer(**TINY_KWARGS)
    original = tmp_path / 'ckpt_epoch_299.pth'
    torch.save({'model': files['tiny'], 'optimizer': {}, 'lr_scheduler': {}, 'epoch': 299,
                'max_accuracy': 82.2, 'config': CfgNode({'TAG': 'default'})}, original)
    for source, expected in ((files['tiny.pdparams'], 'tiny'), (files['training.pdparams'], 'ema'), (original, 'tiny')):
        destination = tmp_path / f'{source.stem}.safetensors'
        assert convert_checkpoint.cli([str(source), str(destination)]) == 0
        assert capsys.readouterr().out == f'{destination}: {len(files["tiny"])} tensors from {source}\n'
        with safetensors.safe_open(destination, 'pt') as converted:
            assert converted.metadata() == {'format': 'pt'}
        converted = safetensors.torch.load_file(destination)
        assert converted.keys() == files[expected].keys()
        torch.testing.assert_close(logits(model, converted), logits(model, files[expected]), rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == ['ckpt_epoch_299.pth', 'ckpt_epoch_299.safetensors',
                                            'tiny.safetensors', 'training.safetensors']


def test_the_readme_conversion_command(files, tmp_path):
    destination = tmp_path / 'tiny.safetensors'
    result = subprocess.run([sys.executable, 'convert_checkpoint.py', str(files['tiny.pdparams']), str(destination)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert safetensors.torch.load_file(destination).keys() == files['tiny'].keys()

    truncated = tmp_path / 'half.pdparams'
    content = files['tiny.pdparams'].read_bytes()
    truncated.write_bytes(content[:len(content) // 2])
    result = subprocess.run([sys.executable, 'convert_checkpoint.py', str(truncated), str(tmp_path / 'half.safetensors')],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f'error: {truncated} is not a readable .pdparams (truncated or damaged): '
                                          f'UnpicklingError: pickle data was truncated']
    assert sorted(os.listdir(tmp_path)) == ['half.pdparams', 'tiny.safetensors']


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp('formats_main')
    return {'root': root, 'data': write_image_folder(root / 'data', n_train=2, n_val=2),
            'cfg': write_config(root / 'tiny.yaml')}


def evaluate(workspace, location, output, capsys):
    returncode = main.cli(['--cfg', workspace['cfg'], '--data-path', workspace['data'], '--output', output,
                           '--eval', '--resume', location])
    stdout, stderr = capsys.readouterr()
    return returncode, stdout, [line for line in stderr.splitlines() if line.startswith('error: ')]


def test_main_evaluates_a_pdparams_as_its_pth(files, workspace, capsys):
    outcomes = []
    for name in ('tiny.pth', 'tiny.pdparams'):
        returncode, stdout, errors = evaluate(workspace, str(files[name]), str(workspace['root'] / name), capsys)
        assert returncode == 0 and not errors, errors
        outcomes.append([line.split(' * ', 1)[1] for line in stdout.splitlines() if ' * ' in line])
    assert outcomes[0] == outcomes[1] and len(outcomes[0]) == 2  # Acc@1/Acc@5 and loss lines


def written(path, content):
    path.write_bytes(content)
    return path


BAD_FILES = {
    'another architecture': (
        lambda root, tiny: write_pdparams(root / 'other.pdparams', dict(
            {key: value for key, value in tiny.items() if key != 'norm.bias'},
            **{'layers.1.blocks.1.norm1.weight': torch.ones(16), 'head.weight': torch.ones(3, 8)})),
        '{path} does not fit this model (another architecture?): missing keys: norm.bias; unexpected keys: '
        'layers.1.blocks.1.norm1.weight; wrong shape (checkpoint vs model): head.weight (3, 8) vs (3, 16)'),
    'truncated': (
        lambda root, tiny: written(root / 'half.pdparams', (root / 'tiny.pdparams').read_bytes()[:1000]),
        '{path} is not a readable .pdparams (truncated or damaged): UnpicklingError: pickle data was truncated'),
    'not a pickle': (
        lambda root, tiny: written(root / 'notes.pdparams', b'trained on Tuesday'),
        '{path} is not a checkpoint: neither a PyTorch file, a safetensors file nor a .pdparams'),
}


@pytest.mark.parametrize('name', list(BAD_FILES))
def test_a_bad_pdparams_is_one_line_and_leaves_the_output_folder_as_it_was(files, workspace, name, capsys):
    """A run folder that already holds a run's log, config and checkpoint is not written to
    (no log line, no config.yaml) when the weights do not load."""
    path = BAD_FILES[name][0](files['root'], files['tiny'])
    output = str(workspace['root'] / 'out')
    run = run_dir(output)
    os.makedirs(run, exist_ok=True)
    for existing in ('log_rank0.txt', 'config.yaml', 'ckpt_epoch_0.pth'):
        with open(os.path.join(run, existing), 'w') as f:
            f.write(f'the earlier run\'s {existing}\n')
    before = {entry: open(os.path.join(run, entry)).read() for entry in os.listdir(run)}

    returncode, _, errors = evaluate(workspace, str(path), output, capsys)
    assert returncode == 2
    assert errors == ['error: ' + BAD_FILES[name][1].format(path=path)]
    assert {entry: open(os.path.join(run, entry)).read() for entry in os.listdir(run)} == before
