"""Unreadable training images under DATA.MAX_BAD_SAMPLES: replaced by the next readable image
(the same whatever the workers or the layout, so resumed runs stay identical), named once,
counted in TensorBoard and in the checkpoints, and past the limit one error line naming the
files on every process; validation images are never replaced."""
import os
import shutil
import zipfile

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main
from torchvision.datasets import ImageFolder

from data import DataError, UnreadableImages, build_loader
from data.samplers import ResumableDistributedSampler
from helpers import (assert_ok, run_dir, run_main, write_config, write_image_folder, zip_dataset)
from test_data import make_config
from test_resume import assert_same_training_state

NOT_AN_IMAGE = b'\x89PNG\r\n\x1a\n but not really'
# helpers.write_image_folder's classes, in ImageFolder's order: train/circle/0.png is image 0,
# train/circle/1.png image 1 (the file names sort as strings: 0, 1, 10, 11, 12, 13, 2, ...)
FIRST, SECOND = os.path.join('circle', '0.png'), os.path.join('circle', '1.png')


def damage_zip_member(zip_path, member):
    """Flip a byte inside `member`'s stored data: reading it fails its CRC check."""
    with zipfile.ZipFile(zip_path) as archive:
        info = archive.getinfo(member)
    with open(zip_path, 'r+b') as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = (int.from_bytes(f.read(2), 'little') for _ in range(2))
        f.seek(info.header_offset + 30 + name_length + extra_length + info.compress_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))


def training_epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(images.clone(), labels.clone(), replaced) for images, labels, replaced in loader]


@pytest.mark.parametrize('workers', [0, 2])
@pytest.mark.parametrize('layout', ['folder', 'zip'])
def test_an_unreadable_image_is_replaced_by_the_next_one(tmp_path, layout, workers):
    """The run with image 0 unreadable loads what a run loads whose image 0 is a copy of image 1:
    image 1 augmented as image 0 would have been. Folder: bytes that are no image; zip (cached
    in memory): a member whose CRC check fails."""
    broken = write_image_folder(tmp_path / 'broken', n_train=4, n_val=1)
    replaced_by_hand = shutil.copytree(broken, tmp_path / 'by_hand')
    shutil.copy(os.path.join(broken, 'train', SECOND),
                os.path.join(replaced_by_hand, 'train', FIRST))
    opts = ['DATA.MAX_BAD_SAMPLES', '1', 'DATA.NUM_WORKERS', str(workers)]
    if layout == 'folder':
        with open(os.path.join(broken, 'train', FIRST), 'wb') as f:
            f.write(NOT_AN_IMAGE)
        bad_path, error = os.path.join(broken, 'train', FIRST), 'cannot read image'
        loader = build_loader(make_config(broken, *opts))[0]
        expected = build_loader(make_config(replaced_by_hand, *opts))[0]
    else:
        zipped = zip_dataset(broken, tmp_path / 'broken_zip')
        damage_zip_member(os.path.join(zipped, 'train.zip'), 'circle/0.png')
        bad_path, error = os.path.join(zipped, 'train.zip') + '@/circle/0.png', 'Bad CRC-32'
        loader = build_loader(make_config(zipped, *opts, zip=True, cache_mode='full'))[0]
        expected = build_loader(make_config(zip_dataset(replaced_by_hand, tmp_path / 'by_hand_zip'),
                                            *opts, zip=True, cache_mode='full'))[0]

    for epoch in (0, 1):
        batches, by_hand = training_epoch(loader, epoch), training_epoch(expected, epoch)
        for (images, labels, _), (images_by_hand, labels_by_hand, _) in zip(batches, by_hand):
            assert torch.equal(labels, labels_by_hand) and torch.equal(images, images_by_hand)
        reports = [report for _, _, replaced in batches for report in replaced]
        assert len(reports) == 1 and reports[0][0] == bad_path
        assert reports[0][1].startswith('cannot read') and error in reports[0][1]
        assert all(replaced == [] for _, _, replaced in by_hand)


@pytest.mark.parametrize('workers', [0, 2])
def test_without_a_limit_or_past_it_the_error_names_the_files(tmp_path, workers):
    data = write_image_folder(tmp_path, n_train=4, n_val=1)
    for name in (FIRST, SECOND):
        with open(os.path.join(data, 'train', name), 'wb') as f:
            f.write(NOT_AN_IMAGE)
    first, second = (os.path.join(data, 'train', name) for name in (FIRST, SECOND))
    # the default, 0: the first unreadable image stops the run, as always
    with pytest.raises(DataError, match=f'cannot read image {first}'):
        training_epoch(build_loader(make_config(data, 'DATA.NUM_WORKERS', str(workers)))[0], 0)
    # 1: two unreadable images in a row cannot be replaced within the limit
    loader = build_loader(make_config(data, 'DATA.NUM_WORKERS', str(workers),
                                      'DATA.MAX_BAD_SAMPLES', '1'))[0]
    with pytest.raises(DataError) as error:
        training_epoch(loader, 0)
    assert str(error.value) == (f"2 unreadable training images, more than DATA.MAX_BAD_SAMPLES 1: "
                                f"{first}, {second}")


def test_unreadable_images_are_counted_once_and_stop_past_the_limit():
    unreadable = UnreadableImages(2, torch.device('cpu'))
    unreadable.load_state_dict(['a.png'])
    assert unreadable.add([]) == []
    assert unreadable.add([('a.png', 'cannot read image a.png: x')]) == []  # known already
    assert unreadable.add([('b.png', 'cannot read image b.png: y')] * 2) == \
        [('b.png', 'cannot read image b.png: y')]
    assert len(unreadable) == 2 and unreadable.state_dict() == ['a.png', 'b.png']
    with pytest.raises(DataError) as error:
        unreadable.add([(f'{name}.png', '') for name in 'cdefg'])
    assert str(error.value) == ("7 unreadable training images, more than DATA.MAX_BAD_SAMPLES 2: "
                                "a.png, b.png, c.png, d.png, e.png (+2 more)")


# ---------------------------------------------------------------------------------------------
# main.py
# ---------------------------------------------------------------------------------------------
def bad_samples_in(checkpoint):
    return torch.load(checkpoint, weights_only=True)['bad_samples']


def test_training_goes_past_an_unreadable_image_and_resumes_with_its_count(tmp_path, capsys):
    data = write_image_folder(tmp_path / 'data', n_train=8, n_val=2)
    bad = os.path.join(data, 'train', FIRST)
    with open(bad, 'wb') as f:
        f.write(NOT_AN_IMAGE)
    cfg = write_config(tmp_path / 'tiny.yaml')
    args = ['--cfg', cfg, '--data-path', data, '--opts', 'DATA.MAX_BAD_SAMPLES', '1',
            'DATA.NUM_WORKERS', '2']
    straight = run_dir(str(tmp_path / 'straight'))
    result = run_main(tmp_path, args + ['--output', str(tmp_path / 'straight')])
    assert_ok(result)
    warnings = [line for line in result.stdout.splitlines() if f'cannot read image {bad}' in line]
    assert len(warnings) == 1 and 'replaced by the next readable training image' in warnings[0]
    assert bad_samples_in(os.path.join(straight, 'ckpt_epoch_1.pth')) == [bad]
    events = EventAccumulator(os.path.join(straight, 'tensorboard'))
    events.Reload()
    assert [event.value for event in events.Scalars('train/bad_samples')] == [1.0]

    # started again from its first epoch's checkpoint: the same weights, the file not named again
    resumed = run_dir(str(tmp_path / 'resumed'))
    os.makedirs(resumed)
    shutil.copy(os.path.join(straight, 'ckpt_epoch_0.pth'), resumed)
    result = run_main(tmp_path, args + ['--output', str(tmp_path / 'resumed')])
    assert_ok(result)
    assert ('unreadable training images met before this checkpoint: 1 (DATA.MAX_BAD_SAMPLES 1): '
            f'{bad}') in result.stdout
    assert 'replaced by the next readable' not in result.stdout
    assert_same_training_state(os.path.join(straight, 'ckpt_epoch_1.pth'),
                               os.path.join(resumed, 'ckpt_epoch_1.pth'))
    assert bad_samples_in(os.path.join(resumed, 'ckpt_epoch_1.pth')) == [bad]

    # the count survives the resume: with the first file mended and another one broken, the
    # second is one too many
    shutil.copy(os.path.join(data, 'train', SECOND), bad)
    other = os.path.join(data, 'train', 'square', '3.png')
    with open(other, 'wb') as f:
        f.write(NOT_AN_IMAGE)
    again = run_dir(str(tmp_path / 'again'))
    os.makedirs(again)
    shutil.copy(os.path.join(straight, 'ckpt_epoch_0.pth'), again)
    capsys.readouterr()
    assert main.cli(args + ['--output', str(tmp_path / 'again')]) == 2  # in-process: saves ~5 s
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: 2 unreadable training images, more than DATA.MAX_BAD_SAMPLES 1: {bad}, {other}"]


def test_every_process_stops_together_past_the_limit(tmp_path):
    data = write_image_folder(tmp_path / 'data', n_train=4, n_val=1)
    # one unreadable image in the first batch of each of the two processes
    paths = [path for path, _ in ImageFolder(os.path.join(data, 'train')).samples]
    first_batches = []
    for rank in (0, 1):
        sampler = ResumableDistributedSampler(len(paths), 4, num_replicas=2, rank=rank)
        first_batches.append([index for _, index in sampler][:4])
    bad = [paths[first_batches[0][0]], paths[first_batches[1][0]]]
    for path in bad:
        with open(path, 'wb') as f:
            f.write(NOT_AN_IMAGE)
    result = run_main(tmp_path, ['--cfg', write_config(tmp_path / 'tiny.yaml'), '--data-path', data,
                                 '--output', str(tmp_path / 'out'), '--opts',
                                 'DATA.MAX_BAD_SAMPLES', '1'], nproc=2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    # whichever process met which file, both know both and stop at the same step
    assert len(errors) == 2 and errors[0] == errors[1], result.stderr[-3000:]
    assert errors[0].startswith('error: 2 unreadable training images, more than '
                                'DATA.MAX_BAD_SAMPLES 1: ')
    assert sorted(errors[0].split(': ', 2)[2].split(', ')) == sorted(bad)


def test_a_bad_validation_image_is_never_replaced(tmp_path, capsys):
    data = write_image_folder(tmp_path / 'data', n_train=4, n_val=1)
    bad = os.path.join(data, 'val', 'square', '0.png')
    with open(bad, 'wb') as f:
        f.write(NOT_AN_IMAGE)
    returncode = main.cli(['--cfg', write_config(tmp_path / 'tiny.yaml'), '--data-path', data,
                           '--output', str(tmp_path / 'out'), '--opts', 'DATA.MAX_BAD_SAMPLES', '5',
                           'TRAIN.EPOCHS', '1'])
    lines = capsys.readouterr().err.strip().splitlines()
    assert returncode == 2 and len(lines) == 1
    assert lines[0].startswith(f'error: cannot read image {bad}')
