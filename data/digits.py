"""The built-in demo data set: scikit-learn's handwritten digits as a PNG ImageFolder.

`sklearn.datasets.load_digits` ships 1,797 real 8x8 greyscale scans of the digits 0-9 inside
scikit-learn, so the demo needs no download. They are split once, stratified and with a fixed seed,
into 1,437 training and 360 validation images, upsampled to the model's input size and written as

    <root>/digits_<img_size>/train/<class>/<index>.png
    <root>/digits_<img_size>/val/<class>/<index>.png

where <index> is the image's position in `load_digits()`. The folder is built under a temporary
name and renamed into place only when every file (and the completion marker) is written, so a
folder under the final name is always complete; a temporary folder left by an interrupted write is
discarded and written again. Problems raise `DataError` (one line naming the folder or value),
which main.py reports as bad input.
"""
import fcntl
import json
import os
import shutil
import time

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from .image_io import DataError

# Where the demos write their data when DATA.DATA_PATH is not set.
DEMO_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'focal_transformer')
NUM_VAL = 360
SPLIT_SEED = 0
COMPLETE_MARKER = 'COMPLETE.json'


def ensure_digits_imagefolder(root, img_size, is_writer, timeout=600.0, poll_interval=0.5):
    """Return the folder holding `train/` and `val/` digits at `img_size` under `root` (DEMO_CACHE/digits
    when empty), writing it on first use.

    The writer (rank 0) builds the folder if it is missing or incomplete; the other ranks
    (`is_writer=False`) only wait, up to `timeout` seconds, for the writer to finish.
    """
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 8:
        raise DataError(f"digits: img_size must be an integer >= 8 (the scans are 8x8), got {img_size!r}")
    root = root or os.path.join(DEMO_CACHE, 'digits')
    folder = os.path.join(os.path.abspath(os.path.expanduser(root)), f'digits_{img_size}')
    return build_once(folder, lambda partial: _write_split_images(partial, img_size), is_writer,
                      timeout, poll_interval)


def build_once(folder, write, is_writer, timeout=600.0, poll_interval=0.5):
    """Return `folder` complete, built on first use by `write(partial_folder) -> marker dict`.

    The writer fills a temporary folder beside `folder`, writes the marker (COMPLETE_MARKER,
    the dict as JSON) last and renames the folder into place; a process with `is_writer=False`
    only waits, up to `timeout` seconds, for the marker to appear.
    """
    if _is_complete(folder):
        return folder
    if is_writer:
        _write_locked(folder, write)
    else:
        _wait_for(folder, timeout, poll_interval)
    return folder


def train_val_scans(digits):
    """(training, validation) indices into `load_digits()`: the fixed stratified split."""
    indices = np.arange(len(digits.target))
    return train_test_split(indices, test_size=NUM_VAL, stratify=digits.target, random_state=SPLIT_SEED)


def _is_complete(folder):
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


def _write_locked(folder, write):
    root = os.path.dirname(folder)
    try:
        os.makedirs(root, exist_ok=True)
        with open(folder + '.lock', 'w') as lock_file:
            # The lock serialises independent runs that share the cache (two demos started at
            # once): whoever holds it knows that any temporary folder is a leftover, not another
            # writer's work in progress.
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            if _is_complete(folder):
                return
            partial = folder + '.partial'
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
            marker = write(partial)
            with open(os.path.join(partial, COMPLETE_MARKER), 'w') as f:
                json.dump(marker, f)
            # A folder under the final name without the marker was not written by this code (the
            # rename is atomic): a hand-made or truncated copy, replaced rather than trusted.
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(partial, folder)
    except OSError as error:
        raise DataError(f"digits: cannot write the demo data set under {root}: {error}") from None


def _write_split_images(folder, img_size):
    digits = load_digits()
    train_indices, val_indices = train_val_scans(digits)
    for split, split_indices in (('train', train_indices), ('val', val_indices)):
        for label in np.unique(digits.target):
            os.makedirs(os.path.join(folder, split, str(label)))
        for index in sorted(split_indices):
            image = _upsampled_rgb(digits.images[index], img_size)
            image.save(os.path.join(folder, split, str(digits.target[index]), f'{index}.png'))
    return {'img_size': img_size, 'train': len(train_indices), 'val': len(val_indices),
            'split_seed': SPLIT_SEED}


def _upsampled_rgb(scan, img_size):
    """An 8x8 scan with ink values 0..16 as an img_size x img_size RGB image, white ink on black."""
    grey = np.round(scan * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(grey).resize((img_size, img_size), Image.Resampling.BICUBIC).convert('RGB')


def _wait_for(folder, timeout, poll_interval):
    deadline = time.monotonic() + timeout
    while not _is_complete(folder):
        if time.monotonic() > deadline:
            raise DataError(
                f"digits: waited {timeout:.0f} s for the writer rank to build {folder}; "
                "is rank 0 running, and does every rank see the same DATA.DATA_PATH?")
        time.sleep(poll_interval)
