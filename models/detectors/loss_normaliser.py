"""A loss normaliser that every process agrees on: the dense and set-prediction heads divide their
summed losses by a count (positives, matched boxes) averaged over the processes, as mmdetection's
reduce_mean, so that a process holding few objects does not weigh its few as much as another's many."""
import torch.distributed as dist
from torch import Tensor

__all__ = ['mean_over_processes']


def mean_over_processes(value: Tensor) -> Tensor:
    """`value` averaged over the processes of the default group (itself in a single process)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value
