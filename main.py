# --------------------------------------------------------
# Focal Transformer: training and evaluation
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""Train or evaluate a Focal Transformer from a YAML config.

    python main.py --cfg configs/focal_tiny_patch4_window7_224.yaml --data-path /imagenet
    torchrun --nproc_per_node 8 main.py --cfg configs/focal_tiny_patch4_window7_224.yaml \
        --data-path /imagenet --batch-size 128
    python main.py --cfg configs/focal_tiny_patch4_window7_224.yaml --data-path /imagenet \
        --eval --resume focal-tiny-is224-ws7.pth

Everything a run writes goes to OUTPUT/MODEL.NAME/TAG/: config.yaml, log_rank*.txt,
tensorboard/, ckpt_epoch_*.pth and ckpt_best.pth. A run started again with the same command
continues from its newest complete checkpoint (TRAIN.AUTO_RESUME), at the exact batch when
TRAIN.SAVE_EVERY_STEPS wrote one, and ends with the same weights as a run never interrupted.

Exit status: 0 done; 1 training failed (non-finite loss); 2 bad input (config, data, checkpoint,
output folder), reported as one `error: ...` line on stderr.
"""
import argparse
import contextlib
import datetime
import functools
import math
import os
import random
import resource
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import AverageMeter, ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from config import ConfigError, get_config
from data import DataError, UnreadableImages, build_loader
from logger import create_logger
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from utils import (BEST_CHECKPOINT, CHECKPOINT_NAME, InputError, atomic_write,
                   auto_resume_helper, is_distributed, load_checkpoint, load_pretrained,
                   prune_checkpoints, reduce_sum, round_namespace, save_checkpoint, ResumePoint)

EXIT_TRAINING_FAILED = 1
EXIT_BAD_INPUT = 2
BAD_INPUT_ERRORS = (ConfigError, DataError, InputError)
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
# --throughput: forward passes before timing, then timed forward passes (as the original).
THROUGHPUT_WARMUP, THROUGHPUT_TIMED = 50, 30


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
                        help='accepted for torch.distributed.launch; torchrun sets LOCAL_RANK')
    args = parser.parse_args(argv)
    config = get_config(args)
    return args, config


# ---------------------------------------------------------------------------------------------
# Process setup
# ---------------------------------------------------------------------------------------------
def init_distributed():
    """(rank, world size, device): one process unless torchrun set RANK and WORLD_SIZE; then a
    process group on NCCL with one GPU per process, or on gloo on the CPU."""
    cuda = torch.cuda.is_available()
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return 0, 1, torch.device('cuda' if cuda else 'cpu')
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
    return rank, world_size, device


def scale_learning_rates(config, world_size):
    """The config's rates are for 512 images per optimizer step; scale them to ours."""
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    factor = config.DATA.BATCH_SIZE * world_size * accumulation / 512.0
    config.defrost()
    config.TRAIN.BASE_LR *= factor
    config.TRAIN.WARMUP_LR *= factor
    config.TRAIN.MIN_LR *= factor
    config.freeze()


def prepare_output_dir(path):
    """Create the run folder and prove it can be written, or raise a one-line InputError."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write_test.{os.getpid()}')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as err:
        raise InputError(f"output folder {path} cannot be written: {err.strerror or err}") from None


def seed_step(seed, epoch, step, rank):
    """Seed every generator a training step draws from (Mixup/CutMix: numpy and random; drop path
    and dropout: torch) from (SEED, epoch, step, rank) alone, so that a run resumed at any step
    draws exactly what the uninterrupted run drew there."""
    state = int(np.random.SeedSequence([seed % 2 ** 32, epoch, step, rank]).generate_state(1)[0])
    random.seed(state)
    np.random.seed(state)
    torch.manual_seed(state)


def memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, kB on Linux


def all_ranks_agree(flag, device):
    """True when `flag` holds on every process (a single process just returns it)."""
    if not is_distributed():
        return flag
    failures = torch.tensor([0.0 if flag else 1.0], device=device)
    return reduce_sum(failures).item() == 0


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(config):
    rank, world_size, device = init_distributed()
    scale_learning_rates(config, world_size)
    torch.manual_seed(config.SEED)  # the same initial weights on every process
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True

    # Validate the data and the model before anything is written.
    _, _, data_loader_train, data_loader_val, mixup_fn = build_loader(config)
    try:
        model = build_model(config)
    except ValueError as err:
        raise ConfigError(f"invalid model configuration: {err}") from None

    output_existed = os.path.isdir(config.OUTPUT)
    prepare_output_dir(config.OUTPUT)
    logger = create_logger(output_dir=config.OUTPUT, dist_rank=rank, name=config.MODEL.NAME)
    try:
        return run(config, logger, rank, world_size, device, model,
                   data_loader_train, data_loader_val, mixup_fn)
    except BAD_INPUT_ERRORS:
        # a run stopped by bad input before its first checkpoint leaves no folder behind
        if rank == 0 and not output_existed and not any(
                CHECKPOINT_NAME.match(name) or name == BEST_CHECKPOINT
                for name in os.listdir(config.OUTPUT)):
            shutil.rmtree(config.OUTPUT, ignore_errors=True)
        raise


def run(config, logger, rank, world_size, device, model, data_loader_train, data_loader_val,
        mixup_fn):
    if rank == 0:
        atomic_write(os.path.join(config.OUTPUT, 'config.yaml'),
                     lambda f: f.write(config.dump().encode()))
    logger.info(f"{world_size} process(es) on {device}; full config saved to "
                f"{os.path.join(config.OUTPUT, 'config.yaml')}")
    logger.debug(config.dump())

    model.to(device)
    if config.TRAIN.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"model {config.MODEL.NAME}: {n_parameters / 1e6:.2f} M parameters, "
                f"{model.flops() / 1e9:.2f} GFLOPs")

    amp_dtype = AMP_DTYPES[config.AMP_DTYPE]
    use_scaler = config.AMP_ENABLE and amp_dtype == torch.float16 and device.type == 'cuda'
    loss_scaler = torch.amp.GradScaler('cuda', enabled=use_scaler)
    if config.AMP_ENABLE:
        logger.info(f"mixed precision: autocast {config.AMP_DTYPE} on {device.type}"
                    + (", with a gradient scaler" if use_scaler else ""))

    optimizer = build_optimizer(config, model)
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    steps_per_epoch = len(data_loader_train) if data_loader_train is not None else None
    updates_per_epoch = math.ceil(steps_per_epoch / accumulation) if steps_per_epoch else 1
    lr_scheduler = build_scheduler(config, optimizer, updates_per_epoch)

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
        load_pretrained(config, model, logger)
    model_ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None
    resume = ResumePoint()
    if config.MODEL.RESUME:
        resume = load_checkpoint(config, model, optimizer, lr_scheduler, loss_scaler, logger,
                                 model_ema=model_ema, steps_per_epoch=steps_per_epoch)

    unreadable = UnreadableImages(config.DATA.MAX_BAD_SAMPLES, device, resume.bad_samples)
    if unreadable.paths:
        logger.info(f"unreadable training images met before this checkpoint: {len(unreadable)} "
                    f"(DATA.MAX_BAD_SAMPLES {config.DATA.MAX_BAD_SAMPLES}): "
                    + ', '.join(unreadable.paths))
    autocast = functools.partial(torch.autocast, device.type, dtype=amp_dtype,
                                 enabled=config.AMP_ENABLE)
    if config.THROUGHPUT_MODE:
        throughput(data_loader_val, model, device, autocast, logger)
        return 0
    if config.EVAL_MODE:
        acc1, _, _ = validate(config, data_loader_val, model, device, autocast, logger)
        logger.info(f"Accuracy of the network on the {len(data_loader_val.dataset)} test images: "
                    f"{acc1:.3f}%")
        return 0

    # The buffers are constant index tables: DDP need not sync them before every forward.
    ddp_model = (DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda'
                                         else None, forward_sync_buffers=False)
                 if world_size > 1 else None)
    train_model = ddp_model or model
    if config.TRAIN.COMPILE:
        train_model = torch.compile(train_model)

    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # Mixup/CutMix give soft, already smoothed targets
    elif config.MODEL.LABEL_SMOOTHING > 0.:
        criterion = LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    writer = None
    if rank == 0:  # purge what a killed run logged after the point we resume from
        writer = SummaryWriter(os.path.join(config.OUTPUT, 'tensorboard'),
                               purge_step=resume.epoch * steps_per_epoch + resume.step)
    max_accuracy = resume.max_accuracy
    logger.info("Start training")
    start_time = time.time()
    try:
        for epoch in range(resume.epoch, config.TRAIN.EPOCHS):
            start_step = resume.step if epoch == resume.epoch else 0
            data_loader_train.sampler.set_epoch(epoch, start_step)
            train_one_epoch(config, train_model, ddp_model, model, criterion, data_loader_train,
                            optimizer, epoch, start_step, mixup_fn, lr_scheduler, loss_scaler,
                            model_ema, device, rank, autocast, logger, writer, max_accuracy,
                            unreadable)

            # the bare model: val shards differ in size, and a DDP forward would wait for peers
            acc1, acc5, val_loss = validate(config, data_loader_val, model, device, autocast,
                                            logger)
            is_best = acc1 > max_accuracy
            max_accuracy = max(max_accuracy, acc1)
            if model_ema is not None:
                logger.info("EMA weights:")
                validate(config, data_loader_val, model_ema.module, device, autocast, logger)
            if rank == 0:
                checkpoint_args = (config, epoch, None, model, max_accuracy, optimizer,
                                   lr_scheduler, loss_scaler, logger, model_ema)
                # the best first: a run killed between the two redoes this epoch and saves both
                if is_best:
                    save_checkpoint(*checkpoint_args, name=BEST_CHECKPOINT,
                                    bad_samples=unreadable.paths)
                if epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
                    save_checkpoint(*checkpoint_args, bad_samples=unreadable.paths)
                    prune_checkpoints(config.OUTPUT, config.TRAIN.KEEP_CHECKPOINTS, logger)
                writer.add_scalar('val/loss', val_loss, epoch)
                writer.add_scalar('val/acc1', acc1, epoch)
                writer.add_scalar('val/acc5', acc5, epoch)
            logger.info(f"Accuracy of the network on the {len(data_loader_val.dataset)} test "
                        f"images: {acc1:.3f}%")
            logger.info(f"Max accuracy: {max_accuracy:.3f}%")
    finally:
        if writer is not None:
            writer.close()

    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    logger.info(f"Training time {total_time}")
    logger.info(f"Best Acc@1 {max_accuracy:.3f}%. Checkpoints: {config.OUTPUT} "
                f"(best: {BEST_CHECKPOINT}); logs: {config.OUTPUT}/log_rank*.txt; "
                f"TensorBoard: tensorboard --logdir {os.path.join(config.OUTPUT, 'tensorboard')}")
    return 0


def train_one_epoch(config, train_model, ddp_model, model, criterion, data_loader, optimizer, epoch,
                    start_step, mixup_fn, lr_scheduler, loss_scaler, model_ema, device, rank,
                    autocast, logger, writer, max_accuracy, unreadable):
    train_model.train()
    optimizer.zero_grad(set_to_none=True)
    num_steps = len(data_loader)
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    updates_per_epoch = math.ceil(num_steps / accumulation)
    clip = config.TRAIN.CLIP_GRAD if config.TRAIN.CLIP_GRAD > 0 else float('inf')
    lr_scheduler.step_update(epoch * updates_per_epoch + start_step // accumulation)

    batch_time, loss_meter, norm_meter = AverageMeter(), AverageMeter(), AverageMeter()
    epoch_start = end = time.time()
    for step, (samples, targets, replaced) in enumerate(data_loader, start=start_step):
        # every process at every step: past DATA.MAX_BAD_SAMPLES all stop here together
        new_unreadable = unreadable.add(replaced)
        for _, error in new_unreadable:
            logger.warning(f"{error}; replaced by the next readable training image")
        if writer is not None and new_unreadable:
            writer.add_scalar('train/bad_samples', len(unreadable), epoch * num_steps + step)
        seed_step(config.SEED, epoch, step, rank)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if config.TRAIN.CHANNELS_LAST:
            samples = samples.contiguous(memory_format=torch.channels_last)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        # Step the optimizer every `accumulation` batches and at the end of the epoch, so that no
        # gradient crosses an epoch boundary (and a checkpoint never holds a partial sum).
        is_update = (step + 1) % accumulation == 0 or step + 1 == num_steps
        no_sync = ddp_model.no_sync() if ddp_model is not None and not is_update \
            else contextlib.nullcontext()
        with no_sync:
            with autocast():
                outputs = train_model(samples)
                loss = criterion(outputs, targets)
            loss_value = loss.item()
            if not all_ranks_agree(math.isfinite(loss_value), device):
                raise NonFiniteLossError(f"non-finite loss ({loss_value}) at epoch {epoch} step "
                                         f"{step} of {num_steps}")
            loss_scaler.scale(loss / accumulation).backward()

        if is_update:
            loss_scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
            # with fp16 an overflow only makes the scaler skip this step, as usual
            if not math.isfinite(grad_norm) and not loss_scaler.is_enabled():
                raise NonFiniteLossError(f"non-finite gradient norm ({grad_norm}) at epoch {epoch} "
                                         f"step {step} of {num_steps}")
            loss_scaler.step(optimizer)
            loss_scaler.update()
            optimizer.zero_grad(set_to_none=True)
            updates_done = epoch * updates_per_epoch + step // accumulation + 1
            lr_scheduler.step_update(updates_done)
            if model_ema is not None:
                model_ema.update(model, step=updates_done)
            norm_meter.update(grad_norm)
            if writer is not None:
                writer.add_scalar('train/grad_norm', grad_norm, epoch * num_steps + step)

        loss_meter.update(loss_value, targets.size(0))
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

        updates_in_epoch = step // accumulation + 1
        if (rank == 0 and is_update and config.TRAIN.SAVE_EVERY_STEPS and step + 1 < num_steps
                and updates_in_epoch % config.TRAIN.SAVE_EVERY_STEPS == 0):
            save_checkpoint(config, epoch, step + 1, model, max_accuracy, optimizer, lr_scheduler,
                            loss_scaler, logger, model_ema, bad_samples=unreadable.paths)
            prune_checkpoints(config.OUTPUT, config.TRAIN.KEEP_CHECKPOINTS, logger)

    epoch_time = time.time() - epoch_start
    if writer is not None:
        writer.add_scalar('train/epoch_time', epoch_time, epoch)
    logger.info(f"EPOCH {epoch} training takes {datetime.timedelta(seconds=int(epoch_time))}")


@torch.no_grad()
def validate(config, data_loader, model, device, autocast, logger):
    """Loss, top-1 and top-5 over the whole val set: each process scores its shard and the sums
    are added up, so the result is exact for any number of processes."""
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction='sum')
    # loss sum, top-1 hits, top-5 hits, images
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    batch_time = AverageMeter()
    end = time.time()
    for step, (images, targets) in enumerate(data_loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if config.TRAIN.CHANNELS_LAST:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            outputs = model(images)
        outputs = outputs.float()
        top = outputs.topk(min(5, outputs.size(1)), dim=1).indices
        hits = top.eq(targets[:, None])
        totals += torch.stack([criterion(outputs, targets), hits[:, :1].sum(), hits.sum(),
                               torch.tensor(targets.size(0), device=device)]).double()
        batch_time.update(time.time() - end)
        end = time.time()
        if step % config.PRINT_FREQ == 0:
            seen = totals[3].clamp(min=1)
            logger.info(f"Test: [{step}/{len(data_loader)}]\t"
                        f"time {batch_time.val:.3f} ({batch_time.avg:.3f})\t"
                        f"loss {totals[0] / seen:.4f}\tAcc@1 {100 * totals[1] / seen:.3f}\t"
                        f"Acc@5 {100 * totals[2] / seen:.3f}\tmem {memory_mb(device):.0f}MB")
    reduce_sum(totals)
    loss_sum, top1, top5, count = totals.tolist()
    count = max(count, 1)
    acc1, acc5, loss = 100 * top1 / count, 100 * top5 / count, loss_sum / count
    logger.info(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}")
    logger.info(f" * loss {loss:.6f} over {int(count)} images")
    return acc1, acc5, loss


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


def first_line(err):
    """The message of `err` on one line; a DataLoader worker's error carries the worker's whole
    traceback, whose last line is the original message."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[-1] if lines[0].startswith('Caught ') else lines[0]


def cli(argv=None):
    try:
        _, config = parse_option(argv)
        return main(config)
    except BAD_INPUT_ERRORS as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as err:
        print(f"error: {err}; stopped, the checkpoints saved before it are kept", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    finally:
        if is_distributed():
            dist.destroy_process_group()


if __name__ == '__main__':
    sys.exit(cli())
