"""The DataLoaders of every task, assembled in one place.

`build_loaders(settings, train_set, val_set, ...)` gives the training loader (deterministic, resumable
sampling over `SeededSamples(ReplaceUnreadable(train_set))`, batches of `(samples, targets, replaced)`,
drop_last) and the validation loader (each sample once over all processes), with the same worker set-up:

- a worker ignores the stop signals a scheduler sends to every process of a job (SIGTERM, SIGUSR1) from
  its first instruction (they are blocked while it starts): the training process decides when to stop,
  after its next optimizer step, and then shuts the workers down;
- a worker dies with the process that started it (Linux's parent-death signal), so that a killed training
  process leaves no worker behind;
- `Loader.shut_down()` ends the workers of every iterator the loader gave out: the training loop calls it
  whatever way the run ends. An iterator whose batch raised (a worker's DataError) ends its workers at
  once. Any other iterator left to the garbage collector may live on in a traceback, and at exit the
  interpreter would wait for its workers, which ignore the SIGTERM it sends them; so the workers of
  every Loader still alive at exit are shut down first (an `atexit` hook, which runs before
  multiprocessing's own, registered earlier), for any script or test that iterates a Loader, and so are
  those an iterator collected in a reference cycle left waiting.
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
        # a stop signal to the whole job between a worker's start and its `_worker_init` would kill it
        # (the default action): the workers start with those signals blocked, and `_worker_init` ignores
        # them before unblocking; this process then receives any that arrived meanwhile
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if self.num_workers > 0 else None
        try:
            iterator = super().__iter__()
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self._iterators.add(iterator)
        _LIVE_ITERATORS.add(iterator)
        _WORKERS.update(getattr(iterator, '_workers', ()))
        return _ShutDownOnError(iterator) if self.num_workers > 0 else iterator

    def shut_down(self):
        """Stop every worker of this loader now."""
        for iterator in list(self._iterators):
            _shut_down(iterator)


class _ShutDownOnError:
    """A worker-backed iterator of a Loader that shuts its workers down as soon as a batch raises (a
    worker's DataError): left to the garbage collector, the iterator, held in a cycle by the error's
    traceback, is collected together with its queues, whose finalizers run first, so its workers never
    receive the order to stop and are killed only after DataLoader's timeouts, seconds per worker."""

    def __init__(self, iterator):
        self._iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._iterator)
        except StopIteration:
            raise
        except BaseException:
            _shut_down(self._iterator)
            raise

    def __len__(self):
        return len(self._iterator)

    def __getattr__(self, name):
        return getattr(self._iterator, name)


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
# Every worker started, until multiprocessing forgets it once joined: an iterator collected in a reference
# cycle (with its queues, which close first) can leave its workers waiting for work, and they ignore SIGTERM.
_WORKERS = weakref.WeakSet()


@atexit.register
def _shut_down_live_iterators():
    for iterator in list(_LIVE_ITERATORS):
        _shut_down(iterator)
    for worker in list(_WORKERS):
        if worker.is_alive():
            worker.kill()
            worker.join()


def _worker_init(worker_id):
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by `Loader.__iter__` while it forked
    if sys.platform.startswith('linux'):
        # Sent when the thread that started the worker ends: loaders are iterated from the main thread.
        # (A parent that died before this call is caught by DataLoader's own watchdog within seconds.)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
