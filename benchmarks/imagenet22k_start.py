"""How long the ImageNet-22K loader (data/imagenet22k.py) takes to start: on a folder of fall11's 21,841
synset folders with `--images` empty image files each, written under a temporary folder and deleted
afterwards, the first start (lists every folder, writes the index), a restart (lists the root, reads
the index) and a restart after one folder changed (lists that folder again); each start is
`open_index` plus both splits.

`--full-size N` then replaces the index by one of N entries spread over the same folders (fall11 has
14,197,122 images; made-up names of fall11's length, written as the index would be) and times a restart
that reads it: what a restart costs at full size, without writing 14M files.

    python benchmarks/imagenet22k_start.py --images 4 --full-size 14197122
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.imagenet22k import ImageNet22K, SynsetIndex, index_file, open_index, path_hashes  # noqa: E402
from timm.data import ImageNetInfo  # noqa: E402

HOLDOUT = 0.0035


def start(root, index_dir):
    """(seconds, what open_index did, images) of one start: the index and both splits."""
    began = time.perf_counter()
    index, what = open_index(root, index_dir, is_writer=True)
    images = len(ImageNet22K(index, 'train', HOLDOUT)) + len(ImageNet22K(index, 'val', HOLDOUT))
    return time.perf_counter() - began, what, images


def write_folders(root, synsets, images):
    for synset in synsets:
        folder = os.path.join(root, synset)
        os.makedirs(folder)
        for i in range(images):
            open(os.path.join(folder, f'{synset}_{i}.JPEG'), 'wb').close()


def full_size_index(index, total, seed=0):
    """`index`'s folders with `total` made-up entries (names like n01440764_10026.JPEG)."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(total, np.full(len(index.synsets), 1 / len(index.synsets)))
    names = [f'{synset}_{i}.JPEG' for synset, count in zip(index.synsets, counts) for i in range(count)]
    encoded = [name.encode() for name in names]
    offsets = np.concatenate([[0], np.cumsum([len(name) for name in encoded])]).astype(np.int64)
    blob = np.frombuffer(b''.join(encoded), dtype=np.uint8)
    relative = (f'{name[:9]}/{name}' for name in names)
    return SynsetIndex(index.root, index.synsets, index.mtimes, counts, blob, offsets, path_hashes(relative))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=4, help='empty image files per synset folder')
    parser.add_argument('--full-size', type=int, default=0, metavar='N',
                        help='also time a restart reading an index of N entries')
    parser.add_argument('--tmp', default=tempfile.gettempdir(), help='where the folder is written')
    args = parser.parse_args()
    synsets = ImageNetInfo('imagenet-22k').label_names()
    work = tempfile.mkdtemp(prefix='imagenet22k_start_', dir=args.tmp)
    try:
        root, index_dir = os.path.join(work, 'fall11'), os.path.join(work, 'index')
        began = time.perf_counter()
        write_folders(root, synsets, args.images)
        print(f'{len(synsets)} synset folders x {args.images} empty images written in '
              f'{time.perf_counter() - began:.1f} s under {work}')
        for label in ('first start', 'restart'):
            seconds, what, images = start(root, index_dir)
            print(f'{label:32s} {seconds:7.2f} s  ({what}, {images} images)')
        time.sleep(0.02)
        open(os.path.join(root, synsets[100], 'added.JPEG'), 'wb').close()
        seconds, what, images = start(root, index_dir)
        print(f'{"restart, one folder changed":32s} {seconds:7.2f} s  ({what}, {images} images)')
        if args.full_size:
            index, _ = open_index(root, index_dir, is_writer=True)
            began = time.perf_counter()
            full_size_index(index, args.full_size).save(index_file(os.path.realpath(root), index_dir))
            print(f'index of {args.full_size} made-up entries written in {time.perf_counter() - began:.1f} s '
                  f'({os.path.getsize(index_file(os.path.realpath(root), index_dir)) / 2 ** 20:.0f} MiB)')
            for label in ('restart at full size', 'and again'):
                seconds, what, images = start(root, index_dir)
                print(f'{label:32s} {seconds:7.2f} s  ({what}, {images} images)')
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
