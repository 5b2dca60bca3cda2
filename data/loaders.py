"""The DataLoaders of every task, assembled in one place.

`build_loaders(settings, train_set, val_set, ...)` gives the training loader (deterministic, resumable
sampling over `SeededSamples(ReplaceUnreadable(train_set))`, batches of `(samples, targets, replaced)`,
drop_last) and the validation loader (each sample once over all processes), with the same worker set-up:

- a worker ignores the stop signals a scheduler sends to every process of a job (SIGTERM, SIGUSR1): the
  training process decides when to stop, after its next optimizer step, and then shuts the workers down;
- a worker dies with the process that started it (Linux's parent-death signal), so that a killed training
  process leaves no worker behind;
- `Loader.shut_down()` ends the workers of every iterator the loader gave out: the training loop calls it
  whatever way the run ends. An iterator left to the garbage collector lives on in an error's traceback,
  and at exit the interpreter would wait for its workers, which ignore the SIGTERM it sends them; so
  the workers of every Loader still alive at exit are shut down first (an `atexit` hook, which runs
  before multiprocessing's own, registered earlier), for any script or test that iterates a Loader.
"""
import atexit
import ctypes
import signal
import sys
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, default_collate

from .bad_samples import ReplaceUnreadable, collate_training_batch
from .image_io import DataError
from .samplers import ResumableDistributedSampler, SeededSamples, ShardSampler

# The signals a scheduler sends to every process of a job to ask it to stop (SLURM, Kubernetes).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PR_SET_PDEATHSIG = 1  # prctl option: the signal this process gets when its parent exits


@dataclass(frozen=True)
class LoaderSettings:
    """What every loader of a run shares: the config's DATA settings, the seed and this process's place."""
    batch_size: int
    num_workers: int
    pin_memory: bool
    seed: int
    max_bad_samples: int
    steps_per_epoch: int
    rank: int
    world_size: int

    @classmethod
    def from_config(cls, config, rank, world_size):
        data = config.DATA
        return cls(batch_size=data.BATCH_SIZE, num_workers=data.NUM_WORKERS,
                   pin_memory=data.PIN_MEMORY and torch.cuda.is_available(), seed=config.SEED,
                   max_bad_samples=data.MAX_BAD_SAMPLES, steps_per_epoch=config.TRAIN.STEPS_PER_EPOCH,
                   rank=rank, world_size=world_size)


def build_loaders(settings: LoaderSettings, train_set, val_set, where: str, val_batch_size: Optional[int] = None,
                  train_collate: Callable = collate_training_batch, val_collate: Callable = default_collate,
                  shard_first: bool = False):
    """(training loader or None when `train_set` is None, validation loader).

    `where` names the data in errors; `val_batch_size` defaults to the training batch (the dense tasks
    evaluate one image at a time); `train_collate` receives `(sample, target, replaced)` triples;
    `shard_first` samples each process's fixed shard only (a per-process zip cache holds just that).
    """
    # DataLoader draws its workers' base seed from this generator instead of the global one, so
    # loading never moves the main process's random streams (the samples seed themselves)
    common = dict(num_workers=settings.num_workers, pin_memory=settings.pin_memory, worker_init_fn=_worker_init,
                  generator=torch.Generator().manual_seed(settings.seed))
    val_loader = Loader(val_set, sampler=ShardSampler(len(val_set), settings.world_size, settings.rank),
                            batch_size=val_batch_size or settings.batch_size, collate_fn=val_collate, **common)
    if train_set is None:
        return None, val_loader
    sampler = ResumableDistributedSampler(len(train_set), settings.batch_size, settings.world_size, settings.rank,
                                          settings.seed, shard_first, settings.steps_per_epoch)
    train_loader = Loader(SeededSamples(ReplaceUnreadable(train_set, settings.max_bad_samples), settings.seed),
                              sampler=sampler, batch_size=settings.batch_size, collate_fn=train_collate,
                              drop_last=True, **common)
    if len(train_loader) == 0:
        raise DataError(f"DATA.BATCH_SIZE {settings.batch_size} is larger than the {len(sampler)} training "
                        f"images of each of {settings.world_size} process(es) in {where}")
    return train_loader, val_loader


class Loader(DataLoader):
    """A DataLoader that can shut down the workers of the iterators it gave out (`shut_down`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._iterators = weakref.WeakSet()

    def __iter__(self):
        iterator = super().__iter__()
        self._iterators.add(iterator)
        _LIVE_ITERATORS.add(iterator)
        return iterator

    def shut_down(self):
        """Stop every worker of this loader now."""
        for iterator in list(self._iterators):
            _shut_down(iterator)


def _shut_down(iterator):
    """DataLoader has no public call for this: its iterators' `_shutdown_workers` is what their own
    `__del__` runs (the workers are told to finish, then terminated); a worker still alive after that
    ignores SIGTERM and is killed."""
    shutdown = getattr(iterator, '_shutdown_workers', None)
    if shutdown is not None:
        shutdown()
        for worker in iterator._workers:
            if worker.is_alive():
                worker.kill()
                worker.join()


_LIVE_ITERATORS = weakref.WeakSet()


@atexit.register
def _shut_down_live_iterators():
    for iterator in list(_LIVE_ITERATORS):
        _shut_down(iterator)


def _worker_init(worker_id):
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if sys.platform.startswith('linux'):
        # Sent when the thread that started the worker ends: loaders are iterated from the main thread.
        # (A parent that died before this call is caught by DataLoader's own watchdog within seconds.)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
