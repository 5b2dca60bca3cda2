"""Bad input (issue 6): one `error: ...` line on stderr naming the bad thing, exit status 2, no
traceback, and no run folder or checkpoint left behind."""
import glob
import os
import shutil

import pytest
import torch

import main
from helpers import TINY_KWARGS, run_dir, run_main_together, write_config, write_image_folder
from models.focal_transformer import FocalTransformer


def write(path, content):
    with open(path, 'w' if isinstance(content, str) else 'wb') as f:
        f.write(content)
    return str(path)


def tiny_checkpoint(path, **changes):
    torch.save({'model': FocalTransformer(**dict(TINY_KWARGS, **changes)).state_dict()}, path)
    return str(path)


def truncated_checkpoint(path):
    tiny_checkpoint(path)
    content = open(path, 'rb').read()
    return write(path, content[:len(content) // 2])


def corrupt_copy(data, root):
    """A copy of the image folder with one val image that is not an image."""
    copy = shutil.copytree(data, root / 'corrupt_data')
    write(os.path.join(copy, 'val', 'square', '3.png'), b'\x89PNG\r\n\x1a\n not really')
    return str(copy)


# name: (extra arguments given the workspace, what the error line must contain)
CASES = {
    'no --cfg': (lambda ws: ['--data-path', ws['data']], 'the following arguments are required: --cfg'),
    'missing cfg file': (lambda ws: ['--cfg', str(ws['root'] / 'absent.yaml')],
                         'config file not found: {root}/absent.yaml'),
    'malformed YAML': (lambda ws: ['--cfg', write(ws['root'] / 'bad.yaml', 'MODEL: [unclosed\n')],
                       'malformed YAML in {root}/bad.yaml'),
    'unknown key in YAML': (lambda ws: ['--cfg', write(ws['root'] / 'unknown.yaml', 'TRAIN:\n  FOO: 1\n')],
                            "unknown config key 'TRAIN.FOO'"),
    'unknown key in --opts': (lambda ws: ['--opts', 'TRAIN.BOGUS', '1'], "unknown config key 'TRAIN.BOGUS'"),
    'odd --opts list': (lambda ws: ['--opts', 'TRAIN.EPOCHS'], 'odd number of items'),
    'wrong value type': (lambda ws: ['--opts', 'TRAIN.EPOCHS', 'many'], "'TRAIN.EPOCHS'"),
    'zero batch size': (lambda ws: ['--batch-size', '0'], "'DATA.BATCH_SIZE' must be positive, got 0"),
    'negative batch size': (lambda ws: ['--batch-size', '-2'], "'DATA.BATCH_SIZE' must be positive, got -2"),
    'missing data folder': (lambda ws: ['--data-path', str(ws['root'] / 'nowhere')],
                            'data folder not found: {root}/nowhere'),
    'empty data folder': (lambda ws: ['--data-path', ws['empty']], 'no images in {root}/empty/'),
    'corrupt image': (lambda ws: ['--data-path', corrupt_copy(ws['data'], ws['root'])],
                      'cannot read image {root}/corrupt_data/val/square/3.png'),
    'missing --resume file': (lambda ws: ['--resume', str(ws['root'] / 'absent.pth')],
                              'checkpoint not found: {root}/absent.pth'),
    '--resume not a checkpoint': (lambda ws: ['--resume', write(ws['root'] / 'notes.pth', 'hello')],
                                  '{root}/notes.pth is not a checkpoint'),
    '--resume truncated': (lambda ws: ['--resume', truncated_checkpoint(ws['root'] / 'half.pth')],
                           '{root}/half.pth is not a readable PyTorch checkpoint'),
    '--resume another architecture': (
        lambda ws: ['--resume', tiny_checkpoint(ws['root'] / 'wide.pth', embed_dim=16)],
        '{root}/wide.pth does not fit this model (another architecture?): wrong shape '
        '(checkpoint vs model): patch_embed.proj.weight (16, 3, 4, 4) vs (8, 3, 4, 4)'),
    'output folder not writable': (lambda ws: ['--output', os.path.join(
        write(ws['root'] / 'a_file', 'x'), 'out')], 'output folder {root}/a_file/out/tiny_focal/default '
                                                    'cannot be written'),
}


# Run as real processes (exit status, no traceback from the interpreter, a worker-side read error,
# a failed run cleaning up); the rest call main.cli in this process, which is the same code after
# interpreter start-up and saves ~4 s of imports each.
IN_A_SUBPROCESS = ('no --cfg', 'corrupt image', '--resume another architecture',
                   'output folder not writable')


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp('errors')
    os.makedirs(root / 'empty' / 'train')
    os.makedirs(root / 'empty' / 'val')
    return {'root': root, 'data': write_image_folder(root / 'data'), 'empty': str(root / 'empty'),
            'cfg': write_config(root / 'tiny.yaml')}


def arguments(workspace, name):
    output = str(workspace['root'] / 'outputs' / name.replace(' ', '_'))
    args = [] if name == 'no --cfg' else ['--cfg', workspace['cfg']]
    # later flags win; a case's own --opts replaces this one
    args += ['--data-path', workspace['data'], '--output', output, '--opts', 'TRAIN.EPOCHS', '1']
    return args + CASES[name][0](workspace), output


@pytest.fixture(scope='module')
def subprocess_outcomes(workspace):
    """The subprocess cases, run together."""
    cases = {name: arguments(workspace, name) for name in IN_A_SUBPROCESS}
    results = run_main_together(workspace['root'], {name: args for name, (args, _) in cases.items()}, timeout=120)
    return {name: (result.returncode, result.stdout, result.stderr, cases[name][1])
            for name, result in results.items()}


@pytest.mark.parametrize('name', list(CASES))
def test_bad_input_is_one_line_and_exit_2(workspace, subprocess_outcomes, name, capsys):
    if name in IN_A_SUBPROCESS:
        returncode, stdout, stderr, output = subprocess_outcomes[name]
    else:
        args, output = arguments(workspace, name)
        returncode = main.cli(args)
        stdout, stderr = capsys.readouterr()
    expected = CASES[name][1].format(root=workspace['root'])
    lines = stderr.strip().splitlines()
    assert returncode == 2, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), stderr[-2000:]
    assert expected in lines[0]
    assert 'Traceback' not in stdout + stderr
    assert not os.path.exists(run_dir(output)), "a run stopped by bad input leaves no folder"
    assert not glob.glob(os.path.join(output, '**', 'ckpt_*'), recursive=True)
