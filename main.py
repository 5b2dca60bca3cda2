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
How a run stops (preemption, errors) and its exit statuses: lifecycle.py.
"""
import contextlib
import datetime
import functools
import math
import os
import random
import sys
import time

import numpy as np
import torch
from timm.utils import AverageMeter, ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from config import ConfigError, add_legacy_options, get_config, with_classes
from data import UnreadableImages
from distributed import init_distributed
from lifecycle import (BAD_INPUT_ERRORS, EXIT_BAD_INPUT, NonFiniteLossError, OneLineArgumentParser, RunContext,
                       check_earlier_failure, exit_status, failures_recorded, output_folder)
from logger import create_logger, memory_mb, release_log_file
from lr_scheduler import build_scheduler, scaled_learning_rates
from models.build import freeze_as_configured, name_config_keys
from models.checkpoint import atomic_write, error_line
from optimizer import build_optimizer
from tasks import build_task
from utils import BEST_CHECKPOINT, TrainingState, checkpoint_to_resume, load_checkpoint, load_pretrained

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
# --throughput: forward passes before timing, then timed forward passes (as the original).
THROUGHPUT_WARMUP, THROUGHPUT_TIMED = 50, 30


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
    parser.add_argument('--output', type=str, metavar='PATH',
                        help='root of the output folder: OUTPUT/MODEL.NAME/TAG')
    parser.add_argument('--tag', help='tag of experiment')
    parser.add_argument('--eval', action='store_true', help='evaluate only')
    parser.add_argument('--throughput', action='store_true', help='measure throughput only')
    add_legacy_options(parser)
    args = parser.parse_args(argv)
    config = get_config(args)
    return args, config


def seed_step(seed, epoch, step, rank):
    """Seed every generator a training step draws from (Mixup/CutMix: numpy and random; drop path
    and dropout: torch) from (SEED, epoch, step, rank) alone, so that a run resumed at any step
    draws exactly what the uninterrupted run drew there."""
    state = int(np.random.SeedSequence([seed % 2 ** 32, epoch, step, rank]).generate_state(1)[0])
    random.seed(state)
    np.random.seed(state)
    torch.manual_seed(state)


def main(config, stop=None):
    """Train (or evaluate) as `config` says; `stop` is the StopSignals of a training run. Returns 0,
    or raises what lifecycle.exit_status turns into the exit status."""
    rank, world_size, device, store = init_distributed(on_store=check_earlier_failure)
    with failures_recorded(store, rank):
        config = scaled_learning_rates(config, world_size)
        torch.manual_seed(config.SEED)  # the same initial weights on every process
        if device.type == 'cuda':
            torch.backends.cudnn.benchmark = True
        # Validate the data and the model before anything is written.
        task = build_task(config)
        data_loader_train, data_loader_val, class_names = task.build_loaders(config)
        try:
            config = with_classes(config, class_names)
            try:
                model = freeze_as_configured(config, task.build_model(config))
            except ValueError as err:
                raise ConfigError(f"invalid model configuration: {name_config_keys(error_line(err))}") from None
            with output_folder(config.OUTPUT, rank):
                # the log file is written once the weights are known to fit (run)
                logger = create_logger(output_dir=config.OUTPUT, dist_rank=rank, name=config.MODEL.NAME,
                                       hold_file=True)
                return run(config, logger, rank, world_size, device, task, model,
                           data_loader_train, data_loader_val, stop)
        finally:  # however the run stops, its data workers stop now
            for loader in (data_loader_train, data_loader_val):
                if loader is not None:
                    loader.shut_down()


def run(config, logger, rank, world_size, device, task, model, data_loader_train, data_loader_val, stop):
    # --- build ---
    logger.info(f"{world_size} process(es) on {device}")
    logger.debug(config.dump())

    model.to(device)
    if config.TRAIN.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    logger.info(task.describe(config, model))

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

    # --- weights: resumed, or pretrained ---
    resume = checkpoint_to_resume(config, logger)
    if config.MODEL.PRETRAINED and not resume:
        load_pretrained(config, model, logger)  # into the classifier or the task's backbone
    model_ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None
    state = TrainingState(model, optimizer, lr_scheduler, loss_scaler,
                          UnreadableImages(config.DATA.MAX_BAD_SAMPLES, device), config.MODEL.CLASS_NAMES,
                          model_ema)
    if resume:
        load_checkpoint(resume, config, state, logger, steps_per_epoch)
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
        lr = max(group['lr'] for group in optimizer.param_groups)  # the top layer's, with TRAIN.LAYER_DECAY
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
    try:
        _, config = parse_option(argv)
    except BAD_INPUT_ERRORS as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return exit_status(main, config)


if __name__ == '__main__':
    sys.exit(cli())
