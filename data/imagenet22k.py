# --------------------------------------------------------
# Focal Transformer: ImageNet-22K
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""ImageNet-22K (fall11: 21,841 WordNet synsets, 14.2M images) for classification, DATA.DATASET
'imagenet22k'.

Folder layout: DATA.DATA_PATH holds one folder per synset (``n01440764/``) with that class's images
directly inside it, as the fall11 archives unpack. The classes are the synset folders in sorted order
(for the full set, timm's 'imagenet-22k' order). There is no val/ split: an image is held out for
validation when a hash of its path relative to the root falls in the first DATA.HOLDOUT_FRACTION of
the hash range, a choice that needs no shared state and is the same on every process, at every
restart, and for an image whatever else is added.

Zip layout (DATA.ZIP_MODE): ``train.zip``/``train_map.txt`` and ``val.zip``/``val_map.txt``, as
ImageNet-1K's (``data.cached_image_folder``); each member path begins with its synset folder, which
names its label (``check_synset_classes``), in whatever order the map files number them.

The index: listing 14M files takes minutes, so it is done once. Rank 0 lists the synset folders into an
index file (file names, their path hashes, the files per synset, each folder's modification time)
under DATA.INDEX_PATH; every later start, and every other process, reads it. A start lists only the
root and compares the synset folders and their modification times with the index (adding, removing or
renaming an image changes its folder's time): any difference and rank 0 lists again the folders that
changed, the others waiting for an index that matches what they see.
"""
import fcntl
import functools
import hashlib
import os
import re
import time
import zipfile

import numpy as np
from timm.data import ImageNetInfo
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from .image_io import DataError, load_rgb

INDEX_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'focal_transformer', 'imagenet22k')
INDEX_VERSION = 1
SYNSET = re.compile(r'^n\d{8}$')
HASH_RANGE = 2 ** 32
# How many offending folders an error names before "(+N more)".
NAMES_SHOWN = 3


@functools.lru_cache(maxsize=None)
def known_synsets():
    """Every synset of the ImageNet class lists timm ships: fall11's 21,841, the two of Google's list
    without images, and ImageNet-1K's teddy bear, which fall11 lacks."""
    return frozenset(ImageNetInfo('imagenet-21k-goog').label_names()) | \
        frozenset(ImageNetInfo('imagenet-22k-ms').label_names())


def path_hashes(relative_paths):
    """uint32 hash of each relative path (UTF-8, '/'-separated): where it falls in the hold-out draw."""
    return np.array([int.from_bytes(hashlib.blake2b(path.encode(), digest_size=4).digest(), 'big')
                     for path in relative_paths], dtype=np.uint32)


def scan_synset_folders(root):
    """(sorted synset names, modification time in ns of each folder) under `root`; files and hidden
    entries are passed over. A folder that is not a synset is a DataError naming it."""
    try:
        entries = [entry for entry in os.scandir(root) if not entry.name.startswith('.') and entry.is_dir()]
    except OSError as err:
        raise DataError(f"cannot list {root}: {err.strerror or err}") from None
    known = known_synsets()
    bad = sorted(entry.name for entry in entries if not (SYNSET.match(entry.name) and entry.name in known))
    if bad:
        more = f' (+{len(bad) - NAMES_SHOWN} more)' if len(bad) > NAMES_SHOWN else ''
        raise DataError(f"{os.path.join(root, bad[0])} is not a WordNet synset folder "
                        f"({', '.join(bad[:NAMES_SHOWN])}{more}): ImageNet-22K's layout is one folder per "
                        f"synset (n########) of timm's ImageNet lists")
    if not entries:
        raise DataError(f"no synset folders in {root}: ImageNet-22K's layout is one folder per synset (n########)")
    entries.sort(key=lambda entry: entry.name)
    return [entry.name for entry in entries], [entry.stat().st_mtime_ns for entry in entries]


class SynsetIndex:
    """The images of a synset-folder root: `synsets` (sorted), `counts` (images per synset), the file
    names (sorted within each synset) as one UTF-8 blob with `offsets`, their path `hashes`, and the
    folders' `mtimes` the listing saw. numpy arrays only: DataLoader workers share them untouched."""

    def __init__(self, root, synsets, mtimes, counts, names, offsets, hashes):
        self.root = root
        self.synsets = list(synsets)
        self.mtimes = np.asarray(mtimes, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.names = names
        self.offsets = offsets
        self.hashes = hashes
        self.labels = np.repeat(np.arange(len(self.synsets), dtype=np.int64), self.counts)

    def __len__(self):
        return len(self.hashes)

    def relative_path(self, index):
        name = self.names[self.offsets[index]:self.offsets[index + 1]].tobytes().decode()
        return f'{self.synsets[self.labels[index]]}/{name}'

    def matches(self, synsets, mtimes):
        return self.synsets == list(synsets) and np.array_equal(self.mtimes, np.asarray(mtimes, dtype=np.int64))

    @classmethod
    def build(cls, root, synsets, mtimes, previous=None):
        """List `root`'s synset folders; those whose folder time `previous` (an index) already saw are
        taken from it instead."""
        reuse = {}
        if previous is not None:
            for position, (synset, mtime) in enumerate(zip(previous.synsets, previous.mtimes)):
                reuse[synset] = (int(mtime), position)
        starts = np.concatenate([[0], np.cumsum(previous.counts)]) if previous is not None else None
        counts, name_parts, offset_parts, hash_parts = [], [], [], []
        end = 0
        for synset, mtime in zip(synsets, mtimes):
            known = reuse.get(synset)
            if known is not None and known[0] == mtime:
                first, last = starts[known[1]], starts[known[1] + 1]
                blob_start, blob_end = previous.offsets[first], previous.offsets[last]
                names = previous.names[blob_start:blob_end]
                offsets = previous.offsets[first + 1:last + 1] - blob_start
                hashes = previous.hashes[first:last]
            else:
                names, offsets, hashes = _list_synset(root, synset)
            counts.append(len(hashes))
            name_parts.append(names)
            offset_parts.append(offsets + end)
            hash_parts.append(hashes)
            end += len(names)
        names = np.concatenate(name_parts) if name_parts else np.zeros(0, np.uint8)
        offsets = np.concatenate([np.zeros(1, np.int64)] + offset_parts)
        hashes = np.concatenate(hash_parts) if hash_parts else np.zeros(0, np.uint32)
        return cls(root, synsets, mtimes, counts, names, offsets, hashes)

    def save(self, path):
        """Write the index to `path` atomically (a temporary file renamed into place)."""
        partial = f'{path}.partial.{os.getpid()}'
        with open(partial, 'wb') as f:
            np.savez(f, version=np.int64(INDEX_VERSION), root=np.str_(self.root), synsets=np.array(self.synsets),
                     mtimes=self.mtimes, counts=self.counts, names=self.names, offsets=self.offsets,
                     hashes=self.hashes)
        os.replace(partial, path)

    @classmethod
    def load(cls, path, root):
        """The index at `path` for `root`, or None when there is none, it is unreadable, of another
        version or of another root."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                if int(saved['version']) != INDEX_VERSION or str(saved['root']) != root:
                    return None
                return cls(root, saved['synsets'].tolist(), saved['mtimes'], saved['counts'], saved['names'],
                           saved['offsets'], saved['hashes'])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # np.load of a damaged file
            return None


def _list_synset(root, synset):
    """(UTF-8 name blob, end offset of each name, path hashes) of the images in one synset folder."""
    folder = os.path.join(root, synset)
    try:
        names = sorted(entry.name for entry in os.scandir(folder)
                       if entry.name.lower().endswith(IMG_EXTENSIONS) and entry.is_file())
    except OSError as err:
        raise DataError(f"cannot list {folder}: {err.strerror or err}") from None
    encoded = [name.encode() for name in names]
    offsets = np.cumsum([len(name) for name in encoded], dtype=np.int64)
    blob = np.frombuffer(b''.join(encoded), dtype=np.uint8)
    return blob, offsets, path_hashes(f'{synset}/{name}' for name in names)


def index_file(root, index_dir):
    """Where the index of `root` lives: a file under `index_dir` named by a hash of its real path."""
    digest = hashlib.sha256(root.encode()).hexdigest()[:16]
    return os.path.join(index_dir or INDEX_CACHE, f'imagenet22k-{digest}.npz')


def open_index(root, index_dir, is_writer, timeout=7200.0, poll_interval=1.0):
    """The SynsetIndex of `root`, up to date with its synset folders. The writer (rank 0) rebuilds a
    missing or stale index file; the others wait, up to `timeout` seconds, for one that matches the
    folders they see. Returns (index, what happened: 'reused', 'built' or 'rebuilt: <why>')."""
    root = os.path.realpath(root)
    path = index_file(root, index_dir)
    synsets, mtimes = scan_synset_folders(root)
    if not is_writer:
        return _wait_for_index(path, root, synsets, mtimes, timeout, poll_interval), 'reused'
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + '.lock', 'w') as lock_file:
            # serialises independent runs on one root: whoever holds the lock writes a complete index
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            previous = SynsetIndex.load(path, root)
            if previous is not None and previous.matches(synsets, mtimes):
                return previous, 'reused'
            index = SynsetIndex.build(root, synsets, mtimes, previous)
            index.save(path)
    except OSError as err:
        raise DataError(f"cannot write the ImageNet-22K index {path}: {err.strerror or err} "
                        f"(DATA.INDEX_PATH chooses its folder)") from None
    return index, 'built' if previous is None else f'rebuilt: {_changes(previous, synsets, mtimes)}'


def _changes(previous, synsets, mtimes):
    before = dict(zip(previous.synsets, previous.mtimes.tolist()))
    now = dict(zip(synsets, mtimes))
    added, removed = now.keys() - before.keys(), before.keys() - now.keys()
    changed = [synset for synset in now.keys() & before.keys() if now[synset] != before[synset]]
    return f'{len(added)} synset folders added, {len(removed)} removed, {len(changed)} changed'


def _wait_for_index(path, root, synsets, mtimes, timeout, poll_interval):
    deadline = time.monotonic() + timeout
    while True:
        index = SynsetIndex.load(path, root)
        if index is not None and index.matches(synsets, mtimes):
            return index
        if time.monotonic() > deadline:
            raise DataError(f"waited {timeout:.0f} s for rank 0 to write the ImageNet-22K index {path} of {root}; "
                            f"is rank 0 running, do all processes see the same DATA.INDEX_PATH, and did the "
                            f"folders change meanwhile?")
        time.sleep(poll_interval)


class ImageNet22K(Dataset):
    """The 'train' or 'val' split of a SynsetIndex: an image is in 'val' when its path hash falls below
    `holdout_fraction` of the hash range. Items are (image, label); `classes` are the synsets; an
    unreadable image raises a DataError naming it (the bad-sample policy, data.bad_samples)."""

    def __init__(self, index, split, holdout_fraction, transform=None):
        if not 0 < holdout_fraction < 1:
            raise DataError(f"DATA.HOLDOUT_FRACTION must lie between 0 and 1 for ImageNet-22K's folder layout, "
                            f"got {holdout_fraction}")
        held_out = index.hashes < np.uint32(min(round(holdout_fraction * HASH_RANGE), HASH_RANGE - 1))
        self.indices = np.flatnonzero(held_out if split == 'val' else ~held_out)
        if len(self.indices) == 0:
            raise DataError(f"no image of {index.root} falls in its {split} split "
                            f"(DATA.HOLDOUT_FRACTION {holdout_fraction} of {len(index)} images)")
        self.index = index
        self.root = index.root
        self.classes = index.synsets
        self.transform = transform

    def __len__(self):
        return len(self.indices)

    def relative_path(self, item):
        return self.index.relative_path(self.indices[item])

    def __getitem__(self, item):
        position = self.indices[item]
        image = load_rgb(os.path.join(self.root, self.index.relative_path(position)))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.index.labels[position])


def check_synset_classes(class_names, where):
    """The zip layout's class names (data.cached_image_folder: each label's folder in the map file's
    paths) are synsets, each once; anything else is a DataError naming `where`."""
    labels = {}
    for label, name in enumerate(class_names):
        if name not in known_synsets():
            raise DataError(f"{where}: label {label} is not the images of one WordNet synset folder (n########) "
                            f"but {name!r}")
        if labels.setdefault(name, label) != label:
            raise DataError(f"{where} gives synset {name} labels {labels[name]} and {label}")
