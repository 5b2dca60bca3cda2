# --------------------------------------------------------
# Focal Transformer: training and evaluation
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""Train or evaluate a Focal Transformer (a classifier, or the backbone of a detector or a
segmenter) from a YAML config.

    python main.py --cfg configs/focal_tiny_patch4_window7_224.yaml --data-path /imagenet
    torchrun --nproc_per_node 8 main.py --cfg configs/focal_tiny_patch4_window7_224.yaml \
        --data-path /imagenet --batch-size 128
    python main.py --cfg configs/focal_tiny_patch4_window7_224.yaml --data-path /imagenet \
        --eval --resume focal-tiny-is224-ws7.pth
    torchrun --nproc_per_node 8 main.py --cfg configs/detection/mask_rcnn_focal_tiny_1x.yaml \
        --data-path /coco --pretrained focal-tiny-is224-ws7.pth

One loop trains every task (config.TASK); the task (tasks/) supplies the model, the data, the
loss and the evaluation, whose headline metric (Acc@1, bbox AP, mIoU) decides ckpt_best.pth.

Everything a run writes goes to OUTPUT/MODEL.NAME/TAG/: config.yaml, log_rank*.txt,
tensorboard/, ckpt_epoch_*.pth and ckpt_best.pth. A run started again with the same command
continues from its newest complete checkpoint (TRAIN.AUTO_RESUME), at the exact batch when
TRAIN.SAVE_EVERY_STEPS wrote one, and ends with the same weights as a run never interrupted.

Preemption: SIGTERM or SIGUSR1 to the job (every process, data workers included, as SLURM and
Kubernetes send it; or to torchrun, which forwards SIGTERM) lets the current optimizer step
finish; all processes agree on that step, rank 0 saves it atomically as ckpt_epoch_E_step_S.pth,
the log says where, and the run exits with status 75. A signal during evaluation lets it finish
and saves the epoch; one before the first step saves nothing. Started again, the same command
resumes there and ends bit-identical to a run never stopped.

Exit status (errors as one `error: ...` line on stderr, from rank 0 alone when every process
stops for the same reason):
   0  done
   1  training failed: non-finite loss
   2  bad input: config, data, checkpoint, output folder
  74  a checkpoint could not be written (disk full, I/O error); the complete ones are kept
  75  preempted by SIGTERM/SIGUSR1 after saving: run the same command again to continue
Under torchrun, a failure (1, 74) is also left in torchrun's store: the attempts that
--max-restarts starts after it stop at once with the same status instead of training into it
again. torchrun itself exits with 1 after any failed worker or a signal to itself; its summary
lists the workers' statuses.
"""
import argparse
import contextlib
import datetime
import functools
import math
import os
import random
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import AverageMeter, ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from config import ConfigError, get_config
from data import DataError, UnreadableImages
from distributed import is_distributed, reduce_sum, round_namespace
from logger import create_logger, memory_mb, release_log_file
from lr_scheduler import build_scheduler
from models.checkpoint import CheckpointError, atomic_write, error_line
from optimizer import build_optimizer
from tasks import build_task
from utils import (BEST_CHECKPOINT, CheckpointWriteError, TrainingState, auto_resume_helper,
                   load_checkpoint, load_pretrained, parse_checkpoint_name, prune_checkpoints,
                   save_checkpoint)

EXIT_TRAINING_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_CHECKPOINT_WRITE_FAILED = 74  # EX_IOERR of sysexits.h
EXIT_PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h: temporary failure, run me again
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# torchrun's store key under which a failed attempt leaves its exit status and message
FAILURE_KEY = 'focal_transformer/training_failed'
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
# --throughput: forward passes before timing, then timed forward passes (as the original).
THROUGHPUT_WARMUP, THROUGHPUT_TIMED = 50, 30


class OutputFolderError(Exception):
    """The output folder cannot be created or written; the message is one line."""


BAD_INPUT_ERRORS = (ConfigError, DataError, CheckpointError, OutputFolderError)


class NonFiniteLossError(Exception):
    """The loss (or, without a gradient scaler, the gradient norm) became NaN or infinite."""


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def parse_option(argv=None):
    parser = OneLineArgumentParser('Focal Transformer training and evaluation script')
    parser.add_argument('--cfg', type=str, required=True, metavar='FILE',
                        help='path to config file')
    parser.add_argument('--opts', nargs='+', default=None, metavar='KEY VALUE',
                        help="override config keys: --opts TRAIN.EPOCHS 30 DATA.NUM_WORKERS 4")
    parser.add_argument('--batch-size', type=int, help='batch size per process')
    parser.add_argument('--data-path', type=str, help='path to dataset')
    parser.add_argument('--dataset', type=str, help="'imagenet' (any ImageFolder/zip) or 'digits'")
    parser.add_argument('--zip', action='store_true',
                        help='read zipped datasets (train.zip, val.zip)')
    parser.add_argument('--cache-mode', type=str, choices=['no', 'full', 'part'],
                        help='zip mode: no = no cache, full = cache all images, '
                             'part = each process caches its shard')
    parser.add_argument('--resume', help='resume (or, with --eval, evaluate) from this checkpoint '
                                         '(path or http(s):// / file:// URL)')
    parser.add_argument('--pretrained', help='start from these weights, adapted to the model '
                                             '(fine-tuning); path or URL')
    parser.add_argument('--accumulation-steps', type=int, help='gradient accumulation steps')
    parser.add_argument('--use-checkpoint', action='store_true',
                        help='gradient checkpointing to save memory')
    parser.add_argument('--amp', nargs='?', const=True, metavar='DTYPE',
                        help='mixed precision (torch.amp); optionally bf16 or fp16 (AMP_DTYPE)')
    parser.add_argument('--amp-opt-level', type=str, choices=['O0', 'O1', 'O2'],
                        help="the original's apex level: O0 = off, O1/O2 = mixed precision")
    parser.add_argument('--output', type=str, metavar='PATH',
                        help='root of the output folder: OUTPUT/MODEL.NAME/TAG')
    parser.add_argument('--tag', help='tag of experiment')
    parser.add_argument('--eval', action='store_true', help='evaluate only')
    parser.add_argument('--throughput', action='store_true', help='measure throughput only')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None,
                        help='accepted and ignored, for torch.distributed.launch; the device '
                             'comes from the LOCAL_RANK environment variable')
    args = parser.parse_args(argv)
    config = get_config(args)
    return args, config


# ---------------------------------------------------------------------------------------------
# Process setup
# ---------------------------------------------------------------------------------------------
def init_distributed():
    """(rank, world size, device, store): one process unless torchrun set RANK and WORLD_SIZE;
    then a process group on NCCL with one GPU per process, or on gloo on the CPU, and torchrun's
    key-value store (None for one process): the store itself, outside the process group's
    namespace for this start of the group, so that what is written there outlives restarts."""
    cuda = torch.cuda.is_available()
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return 0, 1, torch.device('cuda' if cuda else 'cpu'), None
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device('cuda', local_rank) if cuda else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(device)
    store, rank, world_size = next(dist.rendezvous('env://'))
    # After `torchrun --max-restarts` restarts the group, the store still holds the dead
    # attempt's gloo/NCCL addresses under the same keys, and a new rank may connect to a dead
    # peer; a namespace per start of the group keeps the attempts apart.
    namespace = round_namespace(dist.PrefixStore('focal_start', store), rank, world_size)
    dist.init_process_group('nccl' if cuda else 'gloo', rank=rank, world_size=world_size,
                            store=dist.PrefixStore(namespace, store),
                            device_id=device if cuda else None)
    return rank, world_size, device, store


def scale_learning_rates(config, world_size):
    """The config's rates are for TRAIN.BASE_BATCH_SIZE images per optimizer step; scale them to
    ours."""
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    factor = config.DATA.BATCH_SIZE * world_size * accumulation / float(config.TRAIN.BASE_BATCH_SIZE)
    config.defrost()
    config.TRAIN.BASE_LR *= factor
    config.TRAIN.WARMUP_LR *= factor
    config.TRAIN.MIN_LR *= factor
    config.freeze()


def prepare_output_dir(path):
    """Create the run folder and prove it can be written, or raise a one-line OutputFolderError."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write_test.{os.getpid()}')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as err:
        raise OutputFolderError(f"output folder {path} cannot be written: {err.strerror or err}") from None


def seed_step(seed, epoch, step, rank):
    """Seed every generator a training step draws from (Mixup/CutMix: numpy and random; drop path
    and dropout: torch) from (SEED, epoch, step, rank) alone, so that a run resumed at any step
    draws exactly what the uninterrupted run drew there."""
    state = int(np.random.SeedSequence([seed % 2 ** 32, epoch, step, rank]).generate_state(1)[0])
    random.seed(state)
    np.random.seed(state)
    torch.manual_seed(state)


# ---------------------------------------------------------------------------------------------
# Stopping: signals, agreement between processes, failures torchrun must not retry
# ---------------------------------------------------------------------------------------------
class StopSignals:
    """While installed (a context manager), SIGTERM and SIGUSR1 only record that the job was
    asked to stop (`received`, the first signal's name); the training loop stops at its next
    optimizer step. Later signals change nothing, so a second one during the save is harmless;
    once one has come, they stay ignored until the process has exited with EXIT_PREEMPTED."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if self.received is None else signal.SIG_IGN)

    def _record(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name


def ignore_stop_signals(worker_id, then=None):
    """DataLoader worker_init_fn: the job's stop signal reaches the workers too (SLURM and
    Kubernetes signal every process); the main process decides, a worker just goes on. (Forked
    workers inherit StopSignals' handler, which is harmless there; spawned ones need this.)"""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


class Preempted(Exception):
    """The job was asked to stop; the message says what was saved."""


class EarlierAttemptFailed(Exception):
    """A restarted torchrun attempt found that an earlier attempt of the same torchrun failed."""

    def __init__(self, message, exit_status):
        super().__init__(message)
        self.exit_status = exit_status


def any_process(flags, device):
    """For each flag, whether it holds on any process: one all-reduce for all of them, so that
    every process takes the same decision at the same step."""
    if not is_distributed():
        return [bool(flag) for flag in flags]
    counts = reduce_sum(torch.tensor([float(bool(flag)) for flag in flags], device=device))
    return [count > 0 for count in counts.tolist()]


def record_failure(store, rank, exit_status, err):
    """Leave rank 0's account of the failure in torchrun's store, which outlives the attempt:
    torchrun restarts the group after any failed worker (--max-restarts), and the restarted
    attempt stops at once (check_earlier_failure) instead of training into the same failure."""
    if store is not None and rank == 0:
        store.set(FAILURE_KEY, f'{exit_status} {err}')


def check_earlier_failure(store):
    if store is not None and store.check([FAILURE_KEY]):
        exit_status, message = store.get(FAILURE_KEY).decode().split(' ', 1)
        raise EarlierAttemptFailed(f"an earlier attempt of this torchrun stopped with: {message}; "
                                   f"not training again", int(exit_status))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
class RunContext:
    """What the training loop uses besides the TrainingState (what a checkpoint saves): the
    task, the models, the process, the logs and the stop signals."""

    def __init__(self, config, logger, device, rank, task, model, ddp_model, train_model,
                 autocast, writer, stop):
        self.config, self.logger, self.device, self.rank = config, logger, device, rank
        self.task = task  # model, data, loss and evaluation of config.TASK
        self.model = model  # the bare model (clipping, EMA, evaluation)
        self.ddp_model = ddp_model  # for no_sync() during gradient accumulation; None alone
        self.train_model = train_model  # what the forward pass runs: DDP and/or compiled
        self.autocast = autocast
        self.writer = writer  # TensorBoard, rank 0 only
        self.stop = stop

    def save(self, state, name=None):
        """Rank 0 writes `state` (to `name`, default its position's name, then prunes old
        checkpoints); every process learns whether that worked and raises the same
        CheckpointWriteError if not. Returns the path."""
        config, error = self.config, None
        path = os.path.join(config.OUTPUT, name or state.checkpoint_name())
        if self.rank == 0:
            try:
                save_checkpoint(state, config, self.logger, name)
                if name is None:
                    prune_checkpoints(config.OUTPUT, config.TRAIN.KEEP_CHECKPOINTS, self.logger)
            except CheckpointWriteError as err:
                error = err
        if any_process([error is not None], self.device)[0]:
            raise error or CheckpointWriteError(f"rank 0 could not write a checkpoint in "
                                                f"{config.OUTPUT}")
        return path

    def stop_requested(self, *other_flags):
        """Whether any process received a stop signal, agreed on by all, with `other_flags`
        agreed on in the same all-reduce."""
        return any_process([self.stop is not None and self.stop.received is not None,
                            *other_flags], self.device)

    def preempted(self, state, saved):
        # from here on this process ignores stop signals too (StopSignals.__exit__)
        self.stop.received = self.stop.received or 'a signal to another process'
        where = f"saved {saved}" if saved else "nothing new to save"
        message = (f"stopped by {self.stop.received} at epoch "
                   f"{state.epoch} step {state.step}: {where}; run the same command again to "
                   f"continue (exit status {EXIT_PREEMPTED})")
        self.logger.warning(message)
        return Preempted(message)


def main(config, stop=None):
    """Train (or evaluate) as `config` says; `stop` is the StopSignals of a training run."""
    rank, world_size, device, store = init_distributed()
    check_earlier_failure(store)
    try:
        return build_and_run(config, rank, world_size, device, stop)
    except NonFiniteLossError as err:
        record_failure(store, rank, EXIT_TRAINING_FAILED, err)
        raise
    except CheckpointWriteError as err:
        record_failure(store, rank, EXIT_CHECKPOINT_WRITE_FAILED, err)
        raise


def build_and_run(config, rank, world_size, device, stop):
    scale_learning_rates(config, world_size)
    torch.manual_seed(config.SEED)  # the same initial weights on every process
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True

    # Validate the data and the model before anything is written.
    task = build_task(config)
    data_loader_train, data_loader_val = task.build_loaders(config)
    if stop is not None:
        for loader in (data_loader_train, data_loader_val):
            loader.worker_init_fn = functools.partial(ignore_stop_signals,
                                                      then=loader.worker_init_fn)
    try:
        model = task.build_model(config)
    except ValueError as err:
        raise ConfigError(f"invalid model configuration: {err}") from None

    output_existed = os.path.isdir(config.OUTPUT)
    prepare_output_dir(config.OUTPUT)
    # the log file is written once the weights are known to fit (run)
    logger = create_logger(output_dir=config.OUTPUT, dist_rank=rank, name=config.MODEL.NAME,
                           hold_file=True)
    try:
        return run(config, logger, rank, world_size, device, task, model,
                   data_loader_train, data_loader_val, stop)
    except BAD_INPUT_ERRORS:
        # a run stopped by bad input before its first checkpoint leaves no folder behind
        if rank == 0 and not output_existed and not any(
                parse_checkpoint_name(name) or name == BEST_CHECKPOINT
                for name in os.listdir(config.OUTPUT)):
            shutil.rmtree(config.OUTPUT, ignore_errors=True)
        raise


def run(config, logger, rank, world_size, device, task, model, data_loader_train,
        data_loader_val, stop):
    # --- build ---
    logger.info(f"{world_size} process(es) on {device}")
    logger.debug(config.dump())

    model.to(device)
    if config.TRAIN.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    logger.info(task.describe(model))

    amp_dtype = AMP_DTYPES[config.AMP_DTYPE]
    use_scaler = config.AMP_ENABLE and amp_dtype == torch.float16 and device.type == 'cuda'
    loss_scaler = torch.amp.GradScaler('cuda', enabled=use_scaler)
    if config.AMP_ENABLE:
        logger.info(f"mixed precision: autocast {config.AMP_DTYPE} on {device.type}"
                    + (", with a gradient scaler" if use_scaler else ""))
    autocast = functools.partial(torch.autocast, device.type, dtype=amp_dtype,
                                 enabled=config.AMP_ENABLE)

    optimizer = build_optimizer(config, model, *task.no_weight_decay(model))
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    steps_per_epoch = len(data_loader_train) if data_loader_train is not None else None
    updates_per_epoch = math.ceil(steps_per_epoch / accumulation) if steps_per_epoch else 1
    lr_scheduler = build_scheduler(config, optimizer, updates_per_epoch)

    # --- resume ---
    # A restarted training command continues from its own newest checkpoint whatever --resume
    # says (as the original); an evaluation evaluates the file it was given.
    evaluating = config.EVAL_MODE or config.THROUGHPUT_MODE
    if config.TRAIN.AUTO_RESUME and not (evaluating and config.MODEL.RESUME):
        resume_file = auto_resume_helper(config.OUTPUT, logger)
        if resume_file:
            if config.MODEL.RESUME:
                logger.warning(f"auto-resume changing resume file from {config.MODEL.RESUME} "
                               f"to {resume_file}")
            config.defrost()
            config.MODEL.RESUME = resume_file
            config.freeze()
            logger.info(f"auto resuming from {resume_file}")
        else:
            logger.info(f"no checkpoint found in {config.OUTPUT}, ignoring auto resume")
    if config.MODEL.PRETRAINED and not config.MODEL.RESUME:
        load_pretrained(config, model, logger)  # into the classifier or the task's backbone
    model_ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None
    state = TrainingState(model, optimizer, lr_scheduler, loss_scaler,
                          UnreadableImages(config.DATA.MAX_BAD_SAMPLES, device), model_ema)
    if config.MODEL.RESUME:
        load_checkpoint(config, state, logger, steps_per_epoch)
    # The weights fit: from here on the run writes to its folder.
    release_log_file(logger)
    if rank == 0:
        atomic_write(os.path.join(config.OUTPUT, 'config.yaml'),
                     lambda f: f.write(config.dump().encode()))
    logger.info(f"full config saved to {os.path.join(config.OUTPUT, 'config.yaml')}")
    if state.unreadable.paths:
        logger.info(f"unreadable training images met before this checkpoint: "
                    f"{len(state.unreadable)} (DATA.MAX_BAD_SAMPLES "
                    f"{config.DATA.MAX_BAD_SAMPLES}): " + ', '.join(state.unreadable.paths))

    if config.THROUGHPUT_MODE:
        throughput(data_loader_val, model, device, autocast, logger)
        return 0
    if config.EVAL_MODE:
        _, headline = task.evaluate(config, model, data_loader_val, device, autocast, logger)
        logger.info(f"{task.HEADLINE} of the network on the {len(data_loader_val.dataset)} test "
                    f"images: {headline:.3f}%")
        return 0

    # --- train ---
    # The buffers are constant index tables: DDP need not sync them before every forward.
    ddp_model = (DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda'
                                         else None, forward_sync_buffers=False)
                 if world_size > 1 else None)
    train_model = ddp_model or model
    if config.TRAIN.COMPILE:
        train_model = torch.compile(train_model)

    writer = None
    if rank == 0:  # purge what a killed run logged after the point we resume from
        writer = SummaryWriter(os.path.join(config.OUTPUT, 'tensorboard'),
                               purge_step=state.epoch * steps_per_epoch + state.step)
    context = RunContext(config, logger, device, rank, task, model, ddp_model, train_model,
                         autocast, writer, stop)
    try:
        train(context, state, data_loader_train, data_loader_val)
    finally:
        if writer is not None:
            writer.close()
    return 0


def train(context, state, data_loader_train, data_loader_val):
    """Epochs from the state's position to TRAIN.EPOCHS: train, evaluate, save. Raises
    Preempted, after saving the state, when a process received a stop signal."""
    config, logger, task = context.config, context.logger, context.task
    # before the first step: the state is what was resumed, nothing to save
    if state.epoch < config.TRAIN.EPOCHS and context.stop_requested()[0]:
        raise context.preempted(state, saved=None)
    logger.info("Start training")
    start_time = time.time()
    while state.epoch < config.TRAIN.EPOCHS:
        epoch = state.epoch
        data_loader_train.sampler.set_epoch(epoch, state.step)
        train_one_epoch(context, state, data_loader_train)

        # the bare model: val shards differ in size, and a DDP forward would wait for peers
        metrics, headline = task.evaluate(config, context.model, data_loader_val, context.device,
                                          context.autocast, logger)
        if state.model_ema is not None:
            logger.info("EMA weights:")
            task.evaluate(config, state.model_ema.module, data_loader_val, context.device,
                          context.autocast, logger)
        is_best = headline > state.max_accuracy
        state.max_accuracy = max(state.max_accuracy, headline)
        state.epoch, state.step = epoch + 1, 0
        # a signal during the evaluation: the epoch is complete, save it and stop
        stopping = context.stop_requested()[0] and state.epoch < config.TRAIN.EPOCHS
        # the best first: a run killed between the two redoes this epoch and saves both
        if is_best:
            context.save(state, BEST_CHECKPOINT)
        saved = None
        if epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1 or stopping:
            saved = context.save(state)
        if context.writer is not None:
            for name, value in metrics.items():
                context.writer.add_scalar(f'val/{name}', value, epoch)
        logger.info(f"{task.HEADLINE} of the network on the {len(data_loader_val.dataset)} test "
                    f"images: {headline:.3f}%")
        logger.info(f"Max {task.HEADLINE}: {state.max_accuracy:.3f}%")
        if stopping:
            raise context.preempted(state, saved)

    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    logger.info(f"Training time {total_time}")
    logger.info(f"Best {task.HEADLINE} {state.max_accuracy:.3f}%. Checkpoints: {config.OUTPUT} "
                f"(best: {BEST_CHECKPOINT}); logs: {config.OUTPUT}/log_rank*.txt; "
                f"TensorBoard: tensorboard --logdir {os.path.join(config.OUTPUT, 'tensorboard')}")


def train_one_epoch(context, state, data_loader):
    """Train epoch `state.epoch` from batch `state.step` on, advancing the state batch by batch.
    A stop signal ends it after the next optimizer step, with that step saved."""
    config, logger, device, writer = context.config, context.logger, context.device, context.writer
    epoch, optimizer, loss_scaler = state.epoch, state.optimizer, state.loss_scaler
    context.train_model.train()
    optimizer.zero_grad(set_to_none=True)
    num_steps = len(data_loader)
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    updates_per_epoch = math.ceil(num_steps / accumulation)
    clip = config.TRAIN.CLIP_GRAD if config.TRAIN.CLIP_GRAD > 0 else float('inf')
    state.lr_scheduler.step_update(epoch * updates_per_epoch + math.ceil(state.step / accumulation))

    batch_time, loss_meter, norm_meter = AverageMeter(), AverageMeter(), AverageMeter()
    epoch_start = end = time.time()
    for step, (samples, targets, replaced) in enumerate(data_loader, start=state.step):
        # every process at every step: past DATA.MAX_BAD_SAMPLES all stop here together
        new_unreadable = state.unreadable.add(replaced)
        for _, error in new_unreadable:
            logger.warning(f"{error}; replaced by the next readable training image")
        if writer is not None and new_unreadable:
            writer.add_scalar('train/bad_samples', len(state.unreadable), epoch * num_steps + step)
        seed_step(config.SEED, epoch, step, context.rank)

        # Step the optimizer every `accumulation` batches and at the end of the epoch, so that no
        # gradient crosses an epoch boundary (and a checkpoint never holds a partial sum).
        is_update = (step + 1) % accumulation == 0 or step + 1 == num_steps
        no_sync = context.ddp_model.no_sync() if context.ddp_model is not None and not is_update \
            else contextlib.nullcontext()
        with no_sync:
            with context.autocast():
                loss = context.task.training_loss(context.train_model, samples, targets, device)
            loss_value = loss.item()
            # one all-reduce decides both: stop on a bad loss anywhere, or after this update
            # when any process was signalled
            stopping, non_finite = context.stop_requested(not math.isfinite(loss_value))
            stopping = stopping and is_update
            if non_finite:
                here = f" ({loss_value})" if not math.isfinite(loss_value) else " on another process"
                raise NonFiniteLossError(f"non-finite loss at epoch {epoch} step {step} of "
                                         f"{num_steps}{here}")
            loss_scaler.scale(loss / accumulation).backward()

        if is_update:
            loss_scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(context.model.parameters(), clip).item()
            # with fp16 an overflow only makes the scaler skip this step, as usual
            if not math.isfinite(grad_norm) and not loss_scaler.is_enabled():
                raise NonFiniteLossError(f"non-finite gradient norm ({grad_norm}) at epoch {epoch} "
                                         f"step {step} of {num_steps}")
            loss_scaler.step(optimizer)
            loss_scaler.update()
            optimizer.zero_grad(set_to_none=True)
            updates_done = epoch * updates_per_epoch + step // accumulation + 1
            state.lr_scheduler.step_update(updates_done)
            if state.model_ema is not None:
                state.model_ema.update(context.model, step=updates_done)
            norm_meter.update(grad_norm)
            if writer is not None:
                writer.add_scalar('train/grad_norm', grad_norm, epoch * num_steps + step)
        state.step = step + 1

        loss_meter.update(loss_value, len(samples))
        batch_time.update(time.time() - end)
        end = time.time()
        lr = optimizer.param_groups[0]['lr']
        if writer is not None:
            writer.add_scalar('train/loss', loss_value, epoch * num_steps + step)
            writer.add_scalar('train/lr', lr, epoch * num_steps + step)
        if step % config.PRINT_FREQ == 0 or step + 1 == num_steps:
            eta = datetime.timedelta(seconds=int(batch_time.avg * (num_steps - step - 1)))
            logger.info(
                f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{step}/{num_steps}]\t"
                f"eta {eta} lr {lr:.6f}\t"
                f"time {batch_time.val:.4f} ({batch_time.avg:.4f})\t"
                f"loss {loss_meter.val:.4f} ({loss_meter.avg:.4f})\t"
                f"grad_norm {norm_meter.val:.4f} ({norm_meter.avg:.4f})\t"
                f"mem {memory_mb(device):.0f}MB")

        if stopping:  # the last batch too: then the epoch is trained but not evaluated
            raise context.preempted(state, context.save(state))
        updates_in_epoch = step // accumulation + 1
        if (is_update and config.TRAIN.SAVE_EVERY_STEPS and step + 1 < num_steps
                and updates_in_epoch % config.TRAIN.SAVE_EVERY_STEPS == 0):
            context.save(state)

    epoch_time = time.time() - epoch_start
    if writer is not None:
        writer.add_scalar('train/epoch_time', epoch_time, epoch)
    logger.info(f"EPOCH {epoch} training takes {datetime.timedelta(seconds=int(epoch_time))}")


@torch.no_grad()
def throughput(data_loader, model, device, autocast, logger):
    """Images per second of forward passes on one batch, as the original measures it."""
    model.eval()
    images, _ = next(iter(data_loader))
    images = images.to(device, non_blocking=True)
    batch_size = images.size(0)
    with autocast():
        for _ in range(THROUGHPUT_WARMUP):
            model(images)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        logger.info(f"throughput averaged with {THROUGHPUT_TIMED} times")
        tic = time.time()
        for _ in range(THROUGHPUT_TIMED):
            model(images)
        if device.type == 'cuda':
            torch.cuda.synchronize()
    elapsed = time.time() - tic
    logger.info(f"batch_size {batch_size} throughput {THROUGHPUT_TIMED * batch_size / elapsed:.1f} "
                f"images/s")


def cli(argv=None):
    def report(line):  # every process stops for the same reason: say it once
        if not is_distributed() or dist.get_rank() == 0:
            print(line, file=sys.stderr)

    try:
        _, config = parse_option(argv)
    except BAD_INPUT_ERRORS as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    with StopSignals() if training else contextlib.nullcontext() as stop:
        try:
            return main(config, stop)
        except BAD_INPUT_ERRORS as err:
            print(f"error: {error_line(err)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except NonFiniteLossError as err:
            report(f"error: {err}; stopped, the checkpoints saved before it are kept")
            return EXIT_TRAINING_FAILED
        except CheckpointWriteError as err:
            report(f"error: {err}")
            return EXIT_CHECKPOINT_WRITE_FAILED
        except EarlierAttemptFailed as err:
            report(f"error: {err}")
            return err.exit_status
        except Preempted as err:
            report(f"preempted: {err}")
            return EXIT_PREEMPTED
        finally:
            if is_distributed():
                dist.destroy_process_group()


if __name__ == '__main__':
    sys.exit(cli())
