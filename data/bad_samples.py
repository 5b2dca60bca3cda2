# --------------------------------------------------------
# Focal Transformer: unreadable training images
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""Training past unreadable images (DATA.MAX_BAD_SAMPLES > 0).

In the DataLoader (workers or not), ``ReplaceUnreadable`` answers a request for an image that
cannot be read with the next readable one of the data set, and the batch reports what it
replaced: ``collate_training_batch`` gives ``(images, labels, replaced)``, ``replaced`` listing
``(path, error)`` pairs. In the training process, ``UnreadableImages.add(replaced)`` gathers the
reports of every process, remembers each file once, and raises a ``DataError`` on every process
at the same step once more files than the limit have failed. Its ``state_dict()`` (the paths) is
part of the training state a checkpoint saves and restores, so that a resumed run counts on where
it stopped.
"""
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, default_collate

from .image_io import DataError

# How many offending files the error at the limit names before "(+N more)".
FILES_NAMED = 5


def too_many_error(paths, limit):
    shown = ', '.join(paths[:FILES_NAMED])
    more = f' (+{len(paths) - FILES_NAMED} more)' if len(paths) > FILES_NAMED else ''
    return DataError(f"{len(paths)} unreadable training images, more than DATA.MAX_BAD_SAMPLES "
                     f"{limit}: {shown}{more}")


class ReplaceUnreadable(Dataset):
    """``dataset[index]`` as ``(image, label, replaced)``. With ``limit`` 0 an unreadable image
    raises its ``DataError``; above 0 it is replaced by the next readable image (index + 1, + 2,
    ... wrapping around), a choice that depends on the index alone, and ``replaced`` lists the
    ``(path, error)`` of each image skipped. A ``DataError`` that names no one image is raised."""

    def __init__(self, dataset, limit):
        self.dataset = dataset
        self.limit = limit

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if self.limit == 0:
            return (*self.dataset[index], ())
        replaced = []
        # more consecutive unreadable images than the limit stop the run anyway
        for candidate in range(index, index + self.limit + 1):
            try:
                image, label = self.dataset[candidate % len(self.dataset)]
            except DataError as err:
                if err.path is None:  # not about one image (a zip that cannot be opened)
                    raise
                replaced.append((err.path, str(err)))
                continue
            return image, label, tuple(replaced)
        raise too_many_error([path for path, _ in replaced], self.limit)


def collate_training_batch(batch):
    """DataLoader collate_fn for ``ReplaceUnreadable`` samples: ``(images, labels, replaced)``,
    ``replaced`` the ``(path, error)`` pairs of the whole batch."""
    images, labels = default_collate([(image, label) for image, label, _ in batch])
    return images, labels, [report for _, _, reports in batch for report in reports]


class UnreadableImages:
    """The training images found unreadable so far, over all processes, in the order found.

    Call ``add`` with every batch's ``replaced`` on every process (above a limit of 0 it is a
    collective operation); it returns the reports of files not seen before, the same list on
    every process, and raises ``DataError`` naming the first files once there are more than
    ``limit``. ``paths`` lists them; ``state_dict()`` is that list, what a checkpoint keeps, and
    ``load_state_dict(paths)`` restores it.
    """

    def __init__(self, limit, device):
        self.limit = limit
        self.device = device
        self.paths = []
        self._known = set()

    def state_dict(self):
        return list(self.paths)

    def load_state_dict(self, paths):
        self.paths = list(paths)
        self._known = set(self.paths)

    def __len__(self):
        return len(self.paths)

    def add(self, replaced):
        if self.limit == 0:  # nothing is ever replaced: an unreadable image raised already
            return []
        reports = [(path, error) for path, error in replaced if path not in self._known]
        if dist.is_available() and dist.is_initialized():
            count = torch.tensor([len(reports)], device=self.device)
            dist.all_reduce(count)
            if count.item() > 0:  # rare: worth an exchange of Python objects
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, reports)
                reports = [report for rank_reports in gathered for report in rank_reports]
        new = []
        for path, error in reports:
            if path not in self._known:
                self._known.add(path)
                self.paths.append(path)
                new.append((path, error))
        if len(self.paths) > self.limit:
            raise too_many_error(self.paths, self.limit)
        return new
