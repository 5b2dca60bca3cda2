"""A checkpoint never runs code (issue 22, part 2). Each file here holds a model's real weights
(a .pth also a yacs CfgNode) and a payload whose unpickling would create a marker file: every loader refuses it
with one line naming the file and the refused object, and the marker never appears. The original
repository's training checkpoints (weights, optimizer, scheduler, epoch, a pickled CfgNode) still
evaluate and fine-tune."""
import logging
import os
import pickle

import numpy as np
import pytest
import timm
import torch
from yacs.config import CfgNode

import main
import utils
from helpers import (TIMM_NAME, TIMM_TINY_ARCH, TINY_KWARGS, run_dir, run_main_together, write_config,
                     write_image_folder)
from models.backbone import load_pretrained
from models.checkpoint import CheckpointError
from models.detection import focal_fpn_backbone
from models.focal_transformer import FocalTransformer


class Payload:
    """Unpickled without restriction, this creates `marker` (open(marker, 'w'))."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def original_training_checkpoint(model):
    """What the original repository's save_checkpoint writes (its config pickled as a CfgNode)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)
    config = CfgNode({'MODEL': CfgNode({'NAME': 'focal_tiny'}), 'TAG': 'default'})
    return {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
            'lr_scheduler': scheduler.state_dict(), 'max_accuracy': 82.2, 'epoch': 299,
            'config': config, 'amp': {}}


def poisoned(folder, model, marker, kind):
    """A file of `model`'s weights with a Payload: a torch.save training checkpoint with its
    CfgNode (`kind` 'pth') or a paddle.save-style pickle of numpy arrays ('pdparams')."""
    if kind == 'pth':
        path = folder / 'poisoned.pth'
        torch.save(dict(original_training_checkpoint(model), payload=Payload(marker)), path)
    else:
        path = folder / 'poisoned.pdparams'
        arrays = {key: (value.t() if key.endswith('.weight') and value.dim() == 2 else value).numpy()
                  for key, value in model.state_dict().items()}
        path.write_bytes(pickle.dumps(dict(arrays, payload=Payload(marker)), protocol=4))
    return path


def assert_refused(error, path, refused):
    message = str(error.value)
    assert '\n' not in message and str(path) in message and 'is refused' in message, message
    assert refused in message, message


REFUSED = {'pth': 'GLOBAL io.open', 'pdparams': 'io.open'}


@pytest.mark.parametrize('kind', ['pth', 'pdparams'])
def test_the_poisoned_files_are_armed(tmp_path, kind):
    """Loaded without restriction, each test file does create its marker."""
    marker = tmp_path / 'marker'
    path = poisoned(tmp_path, FocalTransformer(**TINY_KWARGS), marker, kind)
    if kind == 'pth':
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize('kind', ['pth', 'pdparams'])
def test_backbone_detector_and_timm_loaders_refuse_a_payload(tmp_path, kind):
    marker = tmp_path / 'marker'
    path = poisoned(tmp_path, timm.create_model(TIMM_NAME, **TIMM_TINY_ARCH), marker, kind)
    loaders = {
        'load_pretrained': lambda location: load_pretrained(
            timm.create_model(TIMM_NAME, features_only=True, **TIMM_TINY_ARCH), location),
        'focal_fpn_backbone': lambda location: focal_fpn_backbone(TIMM_NAME, pretrained=location,
                                                                  **TIMM_TINY_ARCH),
        'timm pretrained file': lambda location: timm.create_model(
            TIMM_NAME, pretrained=True, pretrained_cfg_overlay=dict(file=location), **TIMM_TINY_ARCH),
    }
    for name, load in loaders.items():
        for location in (str(path), path.as_uri()):
            with pytest.raises(CheckpointError) as error:
                load(location)
            assert_refused(error, path, REFUSED[kind])
            assert not marker.exists(), name


@pytest.mark.parametrize('kind', ['pth', 'pdparams'])
def test_auto_resume_skips_a_poisoned_checkpoint(tmp_path, kind):
    marker = tmp_path / 'marker'
    model = FocalTransformer(**TINY_KWARGS)
    good = dict(original_training_checkpoint(model), config='', epoch=0)
    torch.save(good, tmp_path / 'ckpt_epoch_0.pth')
    poisoned(tmp_path, model, marker, kind).rename(tmp_path / 'ckpt_epoch_1.pth')
    logger = logging.getLogger('test_checkpoint_trust')
    with pytest.MonkeyPatch.context() as patch:
        warnings = []
        patch.setattr(logger, 'warning', warnings.append)
        assert utils.auto_resume_helper(str(tmp_path), logger) == str(tmp_path / 'ckpt_epoch_0.pth')
    assert len(warnings) == 1 and warnings[0].startswith('auto-resume skips ckpt_epoch_1.pth: ')
    assert f"{tmp_path / 'ckpt_epoch_1.pth'} is refused" in warnings[0] and REFUSED[kind] in warnings[0]
    assert not marker.exists()


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp('trust')
    model = FocalTransformer(**TINY_KWARGS)
    torch.save(original_training_checkpoint(model), root / 'ckpt_epoch_299.pth')
    return {'root': root, 'data': write_image_folder(root / 'data', n_train=4, n_val=2),
            'cfg': write_config(root / 'tiny.yaml'), 'marker': root / 'marker',
            'pth': poisoned(root, model, root / 'marker', 'pth'),
            'pdparams': poisoned(root, model, root / 'marker', 'pdparams'),
            'original': root / 'ckpt_epoch_299.pth'}


# name: (arguments given the workspace, which poisoned file it reads; None: the original
# repository's training checkpoint, which must load)
MAIN_CASES = {
    '--eval --resume FILE': (lambda ws: ['--eval', '--resume', str(ws['pth'])], 'pth'),
    '--resume FILE (training)': (lambda ws: ['--resume', str(ws['pth'])], 'pth'),
    '--pretrained FILE': (lambda ws: ['--pretrained', str(ws['pth'])], 'pth'),
    '--eval --resume file:// URL': (lambda ws: ['--eval', '--resume', ws['pth'].as_uri()], 'pth'),
    '--pretrained file:// URL': (lambda ws: ['--pretrained', ws['pth'].as_uri()], 'pth'),
    '--eval --resume FILE.pdparams': (lambda ws: ['--eval', '--resume', str(ws['pdparams'])], 'pdparams'),
    'original checkpoint: --eval --resume': (lambda ws: ['--eval', '--resume', str(ws['original'])], None),
    'original checkpoint: --pretrained': (lambda ws: ['--pretrained', str(ws['original'])], None),
}


# Run as real processes (the exit status and the one stderr line as users see them); the rest
# call main.cli in this process, the same code after interpreter start-up.
IN_A_SUBPROCESS = ('--eval --resume FILE', 'original checkpoint: --pretrained')


def main_arguments(workspace, name):
    output = str(workspace['root'] / 'out' / name.replace(' ', '_').replace('/', '_'))
    return ['--cfg', workspace['cfg'], '--data-path', workspace['data'], '--output', output,
            '--opts', 'TRAIN.EPOCHS', '1'] + MAIN_CASES[name][0](workspace), output


@pytest.fixture(scope='module')
def subprocess_outcomes(workspace):
    cases = {name: main_arguments(workspace, name) for name in IN_A_SUBPROCESS}
    results = run_main_together(workspace['root'], {name: args for name, (args, _) in cases.items()})
    return {name: (result.returncode, result.stdout, result.stderr, cases[name][1])
            for name, result in results.items()}


def run_main_case(workspace, subprocess_outcomes, name, capsys):
    if name in IN_A_SUBPROCESS:
        return subprocess_outcomes[name]
    args, output = main_arguments(workspace, name)
    returncode = main.cli(args)
    stdout, stderr = capsys.readouterr()
    return returncode, stdout, stderr, output


@pytest.mark.parametrize('name', [name for name, (_, kind) in MAIN_CASES.items() if kind])
def test_main_refuses_a_payload_with_one_line_and_exit_2(workspace, subprocess_outcomes, name, capsys):
    returncode, _, stderr, output = run_main_case(workspace, subprocess_outcomes, name, capsys)
    kind = MAIN_CASES[name][1]
    # (an --eval run's scheduler, built for one step, has timm warn on stderr too)
    lines = [line for line in stderr.splitlines() if line.startswith('error: ')]
    assert returncode == 2, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {workspace[kind]} is refused"), stderr[-3000:]
    assert REFUSED[kind] in lines[0]
    assert not workspace['marker'].exists()
    assert 'Traceback' not in stderr and not os.path.exists(run_dir(output))


def test_an_original_training_checkpoint_evaluates_and_fine_tunes(workspace, subprocess_outcomes, capsys):
    returncode, stdout, stderr, _ = run_main_case(workspace, subprocess_outcomes,
                                                  'original checkpoint: --eval --resume', capsys)
    assert returncode == 0, stderr[-3000:]
    assert 'Acc@1 of the network on the 6 test images' in stdout
    returncode, stdout, stderr, output = subprocess_outcomes['original checkpoint: --pretrained']
    assert returncode == 0, stderr[-3000:]
    assert 'pretrained weights: copied' in stdout
    checkpoint = torch.load(f'{run_dir(output)}/ckpt_epoch_0.pth', weights_only=True)
    assert checkpoint['epoch'] == 0 and checkpoint['model']['head.weight'].shape == (3, 16)
    assert not workspace['marker'].exists()


def test_a_pdparams_with_an_object_array_is_refused(tmp_path):
    """An object array's elements are whatever the pickle builds: refused as a whole."""
    path = tmp_path / 'objects.pdparams'
    weights = {key: value.numpy() for key, value in FocalTransformer(**TINY_KWARGS).state_dict().items()}
    path.write_bytes(pickle.dumps(dict(weights, note=np.array(['trained', 3], dtype=object)), protocol=4))
    with pytest.raises(CheckpointError) as error:
        load_pretrained(FocalTransformer(**TINY_KWARGS), str(path))
    assert_refused(error, path, 'a numpy array of dtype object')
