# --------------------------------------------------------
# Focal Transformer: distributed helpers
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""The few distributed helpers the training loop and the tasks need: joining the group torchrun
started, whether this process is one of a group and its rank, a name for this start of the group,
a sum over all processes, and rank 0's batch-norm statistics on every process."""
import os
import time
import uuid

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm


def init_distributed(on_store=None):
    """(rank, world size, device, store): one process unless torchrun set RANK and WORLD_SIZE;
    then a process group on NCCL with one GPU per process, or on gloo on the CPU, and torchrun's
    key-value store (None for one process): the store itself, outside the process group's
    namespace for this start of the group, so that what is written there outlives restarts.
    `on_store(store)` runs once the store is reached and before the group is joined: an attempt that
    must not train can stop there, on every rank alike, before any rank waits for another."""
    cuda = torch.cuda.is_available()
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return 0, 1, torch.device('cuda' if cuda else 'cpu'), None
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device('cuda', local_rank) if cuda else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(device)
    store, rank, world_size = next(dist.rendezvous('env://'))
    if on_store is not None:
        on_store(store)
    # After `torchrun --max-restarts` restarts the group, the store still holds the dead
    # attempt's gloo/NCCL addresses under the same keys, and a new rank may connect to a dead
    # peer; a namespace per start of the group keeps the attempts apart.
    namespace = round_namespace(dist.PrefixStore('focal_start', store), rank, world_size)
    dist.init_process_group('nccl' if cuda else 'gloo', rank=rank, world_size=world_size,
                            store=dist.PrefixStore(namespace, store),
                            device_id=device if cuda else None)
    return rank, world_size, device, store


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size():
    """(rank, number of processes) of this process; (0, 1) outside a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def round_namespace(store, rank, world_size, poll_interval=0.01):
    """A name that every process of this start of the group agrees on and no earlier start used,
    for the keys a process group writes into `store`.

    torchrun's agent store outlives the restarts of `--max-restarts`, so a restarted process could
    read the keys (gloo/NCCL addresses, barrier counts) of a dead one. TORCHELASTIC_RESTART_COUNT
    does not tell starts apart across nodes: an agent that restarts because a peer node failed does
    not count a restart, the failed node's agent does. So rank 0 draws a fresh name and hands it
    to each rank in answer to that rank's own fresh request; a stale request is answered too, and
    harmlessly, and rank 0 waits until every rank has acknowledged this name.
    """
    if world_size == 1:
        return uuid.uuid4().hex
    deadline = time.monotonic() + store.timeout.total_seconds()
    if rank == 0:
        name = uuid.uuid4().hex
        pending = set(range(1, world_size))
        while pending:
            for peer in sorted(pending):
                if store.check([f'ack/{name}/{peer}']):
                    pending.discard(peer)
                elif store.check([f'request/{peer}']):
                    store.set(f'answer/{store.get(f"request/{peer}").decode()}', name)
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(pending)} did not join the process group")
            time.sleep(poll_interval)
        return name
    request = uuid.uuid4().hex
    store.set(f'request/{rank}', request)
    name = store.get(f'answer/{request}').decode()  # waits up to the store's timeout
    store.set(f'ack/{name}/{rank}', b'1')
    return name


def reduce_sum(tensor):
    """Sum `tensor` over all processes in place (a no-op in a single process); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_batch_norm_statistics(model):
    """Rank 0's batch-norm statistics (those its checkpoint keeps) on every process. DDP here does
    not sync buffers, and without SyncBN (on CPUs) each process's statistics differ: an evaluation
    that splits the images over the processes would depend on their number."""
    if is_distributed():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                for buffer in module.buffers():
                    dist.broadcast(buffer, src=0)
