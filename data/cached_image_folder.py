# --------------------------------------------------------
# Focal Transformer: zipped image folders with an in-memory cache
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""An image dataset read from a zip archive and a map file, optionally cached in memory."""
import os

from torch.utils.data import Dataset

from .image_io import DataError, decode_rgb
from .zipreader import ZipReader


def read_map_file(map_file):
    """The (path inside the zip, label) pairs of a map file: one image per line, its path and its
    integer label separated by a tab, as the original's get_started describes."""
    if not os.path.isfile(map_file):
        raise DataError(f"map file not found: {map_file}")
    samples = []
    with open(map_file, 'r') as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip('\n').split('\t')
            if len(fields) != 2 or not fields[1].strip().isdigit():
                raise DataError(f"{map_file} line {line_number}: expected 'path<TAB>label', got {line.strip()!r}")
            samples.append((fields[0], int(fields[1])))
    if not samples:
        raise DataError(f"map file {map_file} lists no images")
    return samples


def _class_names(samples):
    """Each label's name in label order: the folder its images sit in inside the zip, as ImageFolder names
    classes, or the label's number where its images have no folder or several."""
    folders = {}
    for path, label in samples:
        folders.setdefault(label, set()).add(path.split('/', 1)[0] if '/' in path else None)
    names = []
    for label in range(max(folders) + 1):
        found = folders.get(label, {None})
        names.append(next(iter(found)) if len(found) == 1 and None not in found else str(label))
    return names


class CachedImageFolder(Dataset):
    """Images listed in ``map_file`` and stored in ``zip_path``.

    cache_mode 'no' reads every image from the zip when it is used; 'full' keeps the bytes of
    every image in memory; 'part' keeps those of the shard ``index % world_size == rank``, the
    images this process reads when its sampler is sharded the same way.
    """

    def __init__(self, zip_path, map_file, transform=None, cache_mode='no', rank=0, world_size=1):
        if not os.path.isfile(zip_path):
            raise DataError(f"zip file not found: {zip_path}")
        self.zip_path = zip_path
        self.transform = transform
        self.samples = read_map_file(map_file)
        self.targets = [label for _, label in self.samples]
        self.class_names = _class_names(self.samples)

        members = set(ZipReader.archive(zip_path).namelist())
        for path, _ in self.samples:
            if path not in members:
                raise DataError(f"{map_file} lists {path}, which is not in {zip_path}")

        if cache_mode == 'full':
            cached = range(len(self.samples))
        elif cache_mode == 'part':
            cached = range(rank, len(self.samples), world_size)
        elif cache_mode == 'no':
            cached = []
        else:
            raise ValueError(f"unknown cache mode {cache_mode!r} (use 'no', 'part' or 'full')")
        self.cache = {}
        for index in cached:
            try:
                self.cache[index] = ZipReader.read(zip_path, self.samples[index][0])
            except DataError:
                pass  # left uncached: using it raises the error then, as in a folder

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        data = self.cache.get(index)
        if data is None:
            data = ZipReader.read(self.zip_path, path)
        image = decode_rgb(data, f'{self.zip_path}@/{path}')
        if self.transform is not None:
            image = self.transform(image)
        return image, label
