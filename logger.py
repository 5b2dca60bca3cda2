# --------------------------------------------------------
# Focal Transformer: logging
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""A logger writing to the console (rank 0 only, INFO and up) and to ``log_rank{r}.txt``
(every rank, DEBUG and up)."""
import logging
import os
import sys

from termcolor import colored

_FORMAT = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
_COLOR_FORMAT = (colored('[%(asctime)s %(name)s]', 'green')
                 + colored('(%(filename)s %(lineno)d)', 'yellow') + ': %(levelname)s %(message)s')


def create_logger(output_dir, dist_rank=0, name=''):
    """The logger ``name``, (re)configured for ``output_dir``; calling it again replaces the
    handlers an earlier call installed instead of adding more."""
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
    log_file = logging.FileHandler(os.path.join(output_dir, f'log_rank{dist_rank}.txt'), mode='a')
    log_file.setLevel(logging.DEBUG)
    log_file.setFormatter(logging.Formatter(_FORMAT, datefmt='%Y-%m-%d %H:%M:%S'))
    handlers.append(log_file)
    for handler in handlers:
        handler._focal_logger = True
        logger.addHandler(handler)
    return logger
