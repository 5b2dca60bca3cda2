"""The built-in digits demo: the ImageFolder writer (all digits, or some as a folder of one's own), and a
short training run that learns."""
import os
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.datasets import ImageFolder

import data.digits
from data import DataError
from data.digits import COMPLETE_MARKER, ensure_digits_imagefolder

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_files(folder):
    return sorted(os.path.join(dirpath, name)
                  for dirpath, _, names in os.walk(folder) for name in names if name.endswith('.png'))


@pytest.mark.filterwarnings('ignore:.*found in sys.modules:RuntimeWarning')  # runpy of an imported module
def test_some_digits_written_as_a_folder_of_ones_own(tmp_path, monkeypatch, capsys):
    """`python3 -m data.digits FOLDER --digits 5 7` writes those digits' scans of the demo's split, and
    only those; a class that is no digit is one line."""
    folder = tmp_path / 'digits_5_7'
    monkeypatch.setattr(sys, 'argv', ['digits', str(folder), '--digits', '7', '5', '--img-size', '8'])
    runpy.run_module('data.digits', run_name='__main__')
    assert capsys.readouterr().out.strip() == str(folder)
    train_indices, val_indices = data.digits.train_val_scans(load_digits())
    targets = load_digits().target
    for split, indices in (('train', train_indices), ('val', val_indices)):
        written = ImageFolder(str(folder / split))
        assert written.classes == ['5', '7']
        expected = sorted(f'{index}.png' for index in indices if targets[index] in (5, 7))
        assert sorted(os.path.basename(path) for path, _ in written.samples) == expected
    assert Image.open(written.samples[0][0]).size == (8, 8)
    with pytest.raises(DataError, match=r'^digits: the classes must be digits 0-9, got \[3, 12\]$'):
        data.digits.write_digit_folder(str(tmp_path / 'bad'), [12, 3])


def test_split_sizes_balance_and_labels(tmp_path):
    folder = ensure_digits_imagefolder(str(tmp_path), 16, is_writer=True)
    digits = load_digits()
    train, val = ImageFolder(os.path.join(folder, 'train')), ImageFolder(os.path.join(folder, 'val'))
    assert (len(train), len(val)) == (1437, 360)
    assert train.classes == val.classes == [str(d) for d in range(10)]

    all_counts = np.bincount(digits.target)
    for dataset in (train, val):
        counts = np.bincount(dataset.targets, minlength=10)
        proportional = all_counts * len(dataset) / len(digits.target)
        assert np.all(np.abs(counts - proportional) <= 1), counts

    seen = []
    for path, label in train.samples + val.samples:
        index = int(os.path.splitext(os.path.basename(path))[0])
        assert digits.target[index] == label, path
        seen.append(index)
    assert sorted(seen) == list(range(len(digits.target)))  # every scan exactly once

    # The picture is the scan: averaged back down to 8x8 it matches the original ink values.
    path, _ = val.samples[0]
    index = int(os.path.splitext(os.path.basename(path))[0])
    image = Image.open(path)
    assert image.mode == 'RGB' and image.size == (16, 16)
    back = np.asarray(image.convert('L').resize((8, 8), Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(back - digits.images[index] * 255 / 16).mean() < 20


def inodes(folder):
    """The inode of the folder and of every file in it: a rewrite (new files renamed into
    place while the old ones still exist) gives every one a new inode."""
    paths = [folder] + [os.path.join(dirpath, name)
                        for dirpath, _, names in os.walk(folder) for name in names]
    return {path: os.stat(path).st_ino for path in paths}


def test_second_call_reuses_the_folder(tmp_path):
    folder = ensure_digits_imagefolder(str(tmp_path), 8, is_writer=True)
    before = inodes(folder)
    assert len(before) == 1797 + 2  # the folder, the images and the completion marker
    assert ensure_digits_imagefolder(str(tmp_path), 8, is_writer=True) == folder
    assert ensure_digits_imagefolder(str(tmp_path), 8, is_writer=False, timeout=0) == folder
    assert inodes(folder) == before
    # Another size is another folder beside it.
    assert ensure_digits_imagefolder(str(tmp_path), 12, is_writer=True) != folder


def test_leftover_partial_folder_is_discarded(tmp_path):
    partial = tmp_path / 'digits_8.partial'
    (partial / 'train' / '3').mkdir(parents=True)
    (partial / 'train' / '3' / 'stale.png').write_bytes(b'not a png')
    folder = ensure_digits_imagefolder(str(tmp_path), 8, is_writer=True)
    assert not partial.exists()
    files = image_files(folder)
    assert len(files) == 1797 and not any(name.endswith('stale.png') for name in files)


def test_folder_without_marker_is_rewritten(tmp_path):
    half = tmp_path / 'digits_8' / 'train' / '0'
    half.mkdir(parents=True)
    (half / '0.png').write_bytes(b'truncated')
    folder = ensure_digits_imagefolder(str(tmp_path), 8, is_writer=True)
    assert os.path.isfile(os.path.join(folder, COMPLETE_MARKER))
    assert len(ImageFolder(os.path.join(folder, 'train'))) == 1437
    Image.open(os.path.join(folder, 'train', '0', '0.png')).verify()


# A writer that stops for good after its 50th image, once it has said so in a file: the test
# kills it at a known point, whatever the speed of the machine.
STOPPING_WRITER = """
import sys, time
from PIL import Image
from data.digits import ensure_digits_imagefolder
save, saved = Image.Image.save, []
def save_then_stop(image, *args, **kwargs):
    save(image, *args, **kwargs)
    saved.append(1)
    if len(saved) == 50:
        open(sys.argv[2], 'w').close()
        time.sleep(600)
Image.Image.save = save_then_stop
ensure_digits_imagefolder(sys.argv[1], 8, True)
"""


def test_writer_killed_midway_leaves_no_folder_and_next_run_completes(tmp_path):
    stopped = tmp_path / 'stopped'
    writer = subprocess.Popen([sys.executable, '-c', STOPPING_WRITER, str(tmp_path / 'cache'), str(stopped)],
                              cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 60
        while not stopped.exists():
            assert writer.poll() is None, 'the writer ended before its 50th image'
            assert time.monotonic() < deadline, 'the writer did not reach its 50th image in 60 s'
            time.sleep(0.05)
        partial = tmp_path / 'cache' / 'digits_8.partial'
        assert len(image_files(partial)) == 50
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert not (tmp_path / 'cache' / 'digits_8').exists()
    with pytest.raises(DataError, match='digits_8'):
        ensure_digits_imagefolder(str(tmp_path / 'cache'), 8, is_writer=False, timeout=0.2, poll_interval=0.05)
    folder = ensure_digits_imagefolder(str(tmp_path / 'cache'), 8, is_writer=True)
    assert len(image_files(folder)) == 1797 and not partial.exists()


def test_non_writer_waits_for_the_writer(tmp_path, monkeypatch):
    polled = threading.Event()

    def sleep(seconds):  # the waiter has looked for the folder, not found it, and waits
        polled.set()
        time.sleep(seconds)

    monkeypatch.setattr(data.digits, 'time', types.SimpleNamespace(monotonic=time.monotonic, sleep=sleep))
    result = {}

    def wait():
        result['folder'] = ensure_digits_imagefolder(str(tmp_path), 8, is_writer=False, timeout=60,
                                                     poll_interval=0.05)
        result['files'] = len(image_files(result['folder']))

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert polled.wait(60)
    assert waiter.is_alive() and not (tmp_path / 'digits_8').exists()
    folder = ensure_digits_imagefolder(str(tmp_path), 8, is_writer=True)
    waiter.join(60)
    assert result == {'folder': folder, 'files': 1797}


def test_two_writers_at_once_share_one_folder(tmp_path):
    # Two independent demo runs started together on one cache: the second waits on the lock,
    # then finds the first one's folder complete.
    results, errors = [], []

    def write():
        try:
            results.append(ensure_digits_imagefolder(str(tmp_path), 8, is_writer=True))
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    writers = [threading.Thread(target=write) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert errors == [] and len(set(results)) == 1
    assert len(image_files(results[0])) == 1797 and not (tmp_path / 'digits_8.partial').exists()


def test_unwritable_cache_is_a_one_line_error(tmp_path):
    not_a_folder = tmp_path / 'file'
    not_a_folder.write_text('')
    result = subprocess.run(
        [sys.executable, 'main.py', '--cfg', 'configs/focal_micro_digits.yaml',
         '--data-path', str(not_a_folder / 'digits'), '--output', str(tmp_path / 'out')],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith('error: digits: cannot write the demo data set under')
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / 'out').exists()


@pytest.mark.parametrize('bad_size', [0, 4, 32.0, '32', True])
def test_bad_image_size_is_named(tmp_path, bad_size):
    with pytest.raises(DataError, match='img_size'):
        ensure_digits_imagefolder(str(tmp_path), bad_size, is_writer=True)


def test_readme_setup_commands_are_the_demo_and_what_ci_runs():
    with open(os.path.join(REPO_ROOT, 'README.md')) as f:
        setup = f.read().split('## Set up', 1)[1].split('\n## ', 1)[0]
    commands = [block.split('\n', 1)[1].strip() for block in setup.split('```bash')[1:]]
    commands = [command.split('\n```', 1)[0] for command in commands]
    assert len(commands) == 2 and all('\n' not in command for command in commands), commands
    demo, tests = commands
    assert demo.endswith('main.py --cfg configs/focal_micro_digits.yaml')
    assert os.path.isfile(os.path.join(REPO_ROOT, 'configs', 'focal_micro_digits.yaml'))
    with open(os.path.join(REPO_ROOT, '.ci', 'run')) as f:
        assert tests in f.read()


def summary_accuracy(output):
    """The Acc@1 of the last ' * Acc@1 X Acc@5 Y' summary line."""
    return float(re.findall(r' \* Acc@1 ([0-9.]+) Acc@5', output)[-1])


@pytest.mark.slow  # the whole demo on two processes: the slow run (pytest.ini)
def test_demo_learns_under_torchrun_and_evaluates_the_same(tmp_path):
    # ~25 s, worth it: the README's first command end to end, on a fresh digits cache (rank 1
    # waits for rank 0 to write it), then --eval --resume in one process must agree exactly.
    env = dict(os.environ, OMP_NUM_THREADS='1')
    common = ['--cfg', 'configs/focal_micro_digits.yaml', '--data-path', str(tmp_path / 'digits'),
              '--output', str(tmp_path / 'out')]
    train = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
         'main.py', *common, '--opts', 'TRAIN.EPOCHS', '1'],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = tmp_path / 'out' / 'focal_micro_digits' / 'default'
    log = (run_dir / 'log_rank0.txt').read_text()
    trained = summary_accuracy(log)
    assert trained > 50, log[-2000:]  # chance is 10%
    assert 'Best Acc@1' in log and os.listdir(run_dir / 'tensorboard')

    evaluate = subprocess.run(
        [sys.executable, 'main.py', *common, '--eval', '--resume', str(run_dir / 'ckpt_best.pth'),
         '--tag', 'eval'],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert summary_accuracy(evaluate.stdout + evaluate.stderr) == trained
