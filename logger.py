# --------------------------------------------------------
# Focal Transformer: logging
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""A logger writing to the console (rank 0 only, INFO and up) and to ``log_rank{r}.txt``
(every rank, DEBUG and up)."""
import logging
import logging.handlers
import os
import resource
import sys

import torch
from termcolor import colored

_FORMAT = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
_COLOR_FORMAT = (colored('[%(asctime)s %(name)s]', 'green')
                 + colored('(%(filename)s %(lineno)d)', 'yellow') + ': %(levelname)s %(message)s')


def create_logger(output_dir, dist_rank=0, name='', hold_file=False):
    """The logger ``name``, (re)configured for ``output_dir``; calling it again replaces the
    handlers an earlier call installed instead of adding more. With ``hold_file`` the file's lines
    are kept in memory until ``release_log_file``: a run that stops before then (on a checkpoint
    that does not fit) leaves no log in the folder."""
    os.makedirs(output_dir, exist_ok=True)
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in [h for h in logger.handlers if getattr(h, '_focal_logger', False)]:
        logger.removeHandler(handler)
        handler.close()

    handlers = []
    if dist_rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.INFO)
        console.setFormatter(logging.Formatter(_COLOR_FORMAT, datefmt='%Y-%m-%d %H:%M:%S'))
        handlers.append(console)
    log_file = logging.FileHandler(os.path.join(output_dir, f'log_rank{dist_rank}.txt'), mode='a',
                                   delay=True)
    log_file.setLevel(logging.DEBUG)
    log_file.setFormatter(logging.Formatter(_FORMAT, datefmt='%Y-%m-%d %H:%M:%S'))
    if hold_file:  # flushing a BufferingHandler discards its lines (logging.shutdown flushes)
        log_file = _HeldFile(log_file)
    handlers.append(log_file)
    for handler in handlers:
        handler._focal_logger = True
        logger.addHandler(handler)
    return logger


class _HeldFile(logging.handlers.BufferingHandler):
    def __init__(self, log_file):
        super().__init__(capacity=sys.maxsize)
        self.log_file = log_file


def release_log_file(logger):
    """Write the lines a ``create_logger(hold_file=True)`` logger held to its file, and every later
    line straight to it."""
    for held in [h for h in logger.handlers if isinstance(h, _HeldFile)]:
        held.log_file._focal_logger = True
        logger.addHandler(held.log_file)
        logger.removeHandler(held)
        for record in held.buffer:
            held.log_file.handle(record)
        held.close()


def memory_mb(device):
    """Peak memory of this process so far, for the log: CUDA allocations on a GPU, resident set on
    the CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, kB on Linux
