# --------------------------------------------------------
# Focal Transformer: training checkpoints
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""Training checkpoints: writing them, finding the newest complete one, resuming and
fine-tuning from any checkpoint `models.checkpoint` reads.

A checkpoint file given to --resume or --pretrained is one of
  * a training checkpoint written by `save_checkpoint`: a `TrainingState.state_dict()` (model,
    optimizer, lr_scheduler, scaler, epoch, step, max_accuracy, bad_samples, and the EMA weights
    when EMA is on) and the config;
  * the original repository's training checkpoint (with its pickled yacs config) or a released
    model as distributed: a raw state dict that still carries the reference's integer index buffers;
  * a `{'model': state_dict}` dict (the original repository's and Swin's layout);
  * a PaddleViT `.pdparams` or a `.safetensors` file, which hold weights only.
Every way a checkpoint can be unusable raises `models.checkpoint.CheckpointError` with a one-line
message naming the file, and for an architecture mismatch the offending keys; a checkpoint that
cannot be written raises `CheckpointWriteError` naming the folder and the OS error.
"""
import errno
import os
import re
import typing

import torch

from models.backbone import load_backbone_checkpoint
from models.checkpoint import (CheckpointError, atomic_write, check_fits, error_line, model_weights,
                               read_checkpoint, resolve)
from models.focal_transformer import checkpoint_filter_fn


# ckpt_epoch_{E}.pth is written after epoch E; ckpt_epoch_{E}_step_{S}.pth after S batches of it.
CHECKPOINT_NAME = re.compile(r'^ckpt_epoch_(\d+)(?:_step_(\d+))?\.pth$')
BEST_CHECKPOINT = 'ckpt_best.pth'
TRAINING_STATE_KEYS = ('model', 'optimizer', 'lr_scheduler', 'epoch', 'max_accuracy')


def epoch_checkpoint_name(epoch, step=None):
    return f'ckpt_epoch_{epoch}.pth' if step is None else f'ckpt_epoch_{epoch}_step_{step}.pth'


class CheckpointName(typing.NamedTuple):
    """A parsed checkpoint file name: `step` is None for an epoch checkpoint."""
    epoch: int
    step: typing.Optional[int]

    def position(self):
        """Where training continues from this file, as (epoch, batches done in it): the order
        of the files in time (an epoch checkpoint comes after every step checkpoint of its
        epoch)."""
        return (self.epoch + 1, 0) if self.step is None else (self.epoch, self.step)


def parse_checkpoint_name(name):
    """The CheckpointName of a file written by save_checkpoint, or None for any other file
    (ckpt_best.pth included)."""
    match = CHECKPOINT_NAME.match(name)
    if match is None:
        return None
    return CheckpointName(int(match.group(1)), None if match.group(2) is None else int(match.group(2)))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def read_logged(location, logger):
    """read_checkpoint, the local file a URL was cached as named in the log."""
    path = resolve(location)
    if path != location:
        logger.info(f"{location} is read from {path}")
    return read_checkpoint(path)


def load_model_weights(model, checkpoint, path):
    """Load the weights of `checkpoint` into `model` strictly, whatever the accepted layout."""
    state_dict = checkpoint_filter_fn(model_weights(checkpoint, path), model)
    check_fits(state_dict, model.state_dict(), path)
    model.load_state_dict(state_dict, strict=True)


def is_training_checkpoint(checkpoint):
    return all(key in checkpoint for key in TRAINING_STATE_KEYS)


# ---------------------------------------------------------------------------------------------
# Resuming and fine-tuning
# ---------------------------------------------------------------------------------------------
class TrainingState:
    """Everything training needs to go on exactly where it stopped: the model, its EMA, the
    optimizer, the learning-rate scheduler, the gradient scaler, the position (`epoch`, and the
    batches `step` done in it), the best top-1 accuracy so far and the training images found
    unreadable (`unreadable`, a `data.UnreadableImages`, saved as 'bad_samples': their paths, so
    that a resumed run counts on where it stopped). `state_dict()` is what every checkpoint holds,
    whatever wrote it (a step, the end of an epoch, a stop signal), and `load_state_dict()`
    restores it.

    On disk the position keeps the original's convention: 'epoch' E with 'step' None is the end
    of epoch E, evaluated; 'step' S is S batches into epoch E (S = the epoch's length: trained,
    not yet evaluated).
    """

    def __init__(self, model, optimizer, lr_scheduler, loss_scaler, unreadable, model_ema=None):
        self.model = model
        self.model_ema = model_ema
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.loss_scaler = loss_scaler
        self.unreadable = unreadable
        self.epoch = 0
        self.step = 0
        self.max_accuracy = 0.0

    def saved_position(self):
        """(epoch, step) as a checkpoint stores them (see the class docstring)."""
        if self.step == 0 and self.epoch > 0:
            return self.epoch - 1, None
        return self.epoch, self.step

    def checkpoint_name(self):
        return epoch_checkpoint_name(*self.saved_position())

    def state_dict(self):
        epoch, step = self.saved_position()
        state = {
            'model': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'lr_scheduler': self.lr_scheduler.state_dict(),
            'scaler': self.loss_scaler.state_dict(),
            'epoch': epoch,
            'step': step,
            'max_accuracy': self.max_accuracy,
            'bad_samples': self.unreadable.state_dict(),
        }
        if self.model_ema is not None:
            state['model_ema'] = self.model_ema.module.state_dict()
        return state

    def load_state_dict(self, state_dict, steps_per_epoch=None):
        """Restore a training checkpoint. One without EMA weights restarts the EMA from the
        model; a step beyond `steps_per_epoch` (the epoch got shorter) means the epoch's
        training is done. The torch objects raise ValueError, KeyError or RuntimeError when the
        checkpoint does not fit them."""
        self.model.load_state_dict(checkpoint_filter_fn(state_dict['model'], self.model))
        self.optimizer.load_state_dict(state_dict['optimizer'])
        self.lr_scheduler.load_state_dict(state_dict['lr_scheduler'])
        if state_dict.get('scaler'):
            self.loss_scaler.load_state_dict(state_dict['scaler'])
        if self.model_ema is not None:
            self.model_ema.module.load_state_dict(state_dict.get('model_ema', self.model.state_dict()))
        epoch, step = state_dict['epoch'], state_dict.get('step')
        if step is None:  # also the original's checkpoints, which have no 'step'
            self.epoch, self.step = epoch + 1, 0
        else:
            self.epoch = epoch
            self.step = step if steps_per_epoch is None else min(step, steps_per_epoch)
        self.max_accuracy = state_dict['max_accuracy']
        self.unreadable.load_state_dict(state_dict.get('bad_samples', []))


def load_checkpoint(config, state, logger, steps_per_epoch=None):
    """Resume from `config.MODEL.RESUME`: the model always, and, when the file is one of our
    training checkpoints and we are training, the whole TrainingState. A released or
    weights-only file just sets the weights (training then starts at epoch 0)."""
    path = config.MODEL.RESUME
    logger.info(f"==> Resuming from {path}")
    checkpoint = read_logged(path, logger)
    load_model_weights(state.model, checkpoint, path)
    if config.EVAL_MODE or config.THROUGHPUT_MODE:
        return
    if not is_training_checkpoint(checkpoint):
        logger.info(f"{path} holds weights only: training starts at epoch 0")
        return
    if state.model_ema is not None:
        if 'model_ema' in checkpoint:
            check_fits(checkpoint['model_ema'], state.model_ema.module.state_dict(), path)
        else:
            logger.info(f"{path} has no EMA weights: EMA restarts from the resumed model")
    try:
        state.load_state_dict(checkpoint, steps_per_epoch)
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot restore the training state: "
                              f"{error_line(err)}") from None
    logger.info(f"=> resumed {path}: continuing at epoch {state.epoch} step {state.step}, "
                f"best Acc@1 so far {state.max_accuracy:.3f}")


def load_pretrained(config, model, logger):
    """--pretrained: the weights of MODEL.PRETRAINED into the Focal Transformer that `model` is (a
    classifier) or holds (a detector's or segmenter's backbone), adapted by
    models.pretrained.transfer_weights: copied where they fit, the focal tables resized to a new
    window or focal window, new tensors (another head, neighbour keys) fresh; logged."""
    path = config.MODEL.PRETRAINED
    logger.info(f"==> Loading pretrained weights from {path}")
    report = load_backbone_checkpoint(model, read_logged(path, logger), path)
    logger.info(f"=> {path}: {report.summary()}")
    for line in report.details():
        logger.debug(line)


def auto_resume_helper(output_dir, logger=None):
    """The newest checkpoint in `output_dir` that loads and holds the whole training state, or
    None. Newer ones that do not are skipped, with the reason logged."""
    if not os.path.isdir(output_dir):
        return None
    candidates = [(parsed.position(), name) for name in os.listdir(output_dir)
                  for parsed in [parse_checkpoint_name(name)] if parsed is not None]
    for _, name in sorted(candidates, reverse=True):
        path = os.path.join(output_dir, name)
        try:
            checkpoint = read_checkpoint(path)
            missing = [key for key in TRAINING_STATE_KEYS if key not in checkpoint]
            if missing:
                raise CheckpointError(f"{path} is incomplete: no {', '.join(missing)}")
        except CheckpointError as err:
            if logger is not None:
                logger.warning(f"auto-resume skips {name}: {err}")
            continue
        return path
    return None


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
class CheckpointWriteError(Exception):
    """A checkpoint could not be written (disk full, I/O error); the message is one line."""


def _os_error(err):
    """The OSError behind `err`, or None: torch.save reports a failed write as a RuntimeError
    raised while handling the file's OSError."""
    while err is not None and not isinstance(err, OSError):
        err = err.__context__
    return err


def save_checkpoint(state, config, logger, name=None):
    """Write `state` (a TrainingState) and the config to OUTPUT/`name` (default: the name of its
    position) and return the path; call on rank 0 only. A failed write leaves no file behind and
    raises a one-line CheckpointWriteError naming the folder and the OS error."""
    path = os.path.join(config.OUTPUT, name or state.checkpoint_name())
    checkpoint = dict(state.state_dict(), config=config.dump())
    logger.info(f"{path} saving......")
    try:
        atomic_write(path, lambda f: torch.save(checkpoint, f))
    except (OSError, RuntimeError) as err:
        os_error = _os_error(err)
        if os_error is None:
            raise
        reason = os_error.strerror or str(os_error)
        if os_error.errno in errno.errorcode:
            reason += f' ({errno.errorcode[os_error.errno]})'
        raise CheckpointWriteError(f"cannot write checkpoint {os.path.basename(path)} in "
                                   f"{config.OUTPUT}: {reason}; the complete checkpoints "
                                   f"already there are kept") from None
    logger.info(f"{path} saved !!!")
    return path


def prune_checkpoints(output_dir, keep, logger):
    """Keep the newest `keep` epoch checkpoints (0 = all), the newest `keep` step checkpoints
    written after the newest epoch checkpoint, and the best; remove the rest and any temporary
    file a killed write left behind."""
    epochs, steps = [], []
    for name in os.listdir(output_dir):
        parsed = parse_checkpoint_name(name)
        if parsed is not None:
            (epochs if parsed.step is None else steps).append((parsed.position(), name))
        elif name.startswith('.ckpt_') and name.endswith('.tmp'):
            os.remove(os.path.join(output_dir, name))
    epochs.sort()
    steps.sort()
    newest_epoch = epochs[-1][0] if epochs else (0, 0)
    doomed = [name for position, name in steps if position < newest_epoch]
    running = [name for position, name in steps if position > newest_epoch]
    if keep > 0:
        doomed += [name for _, name in epochs[:-keep]] + running[:-keep]
    for name in doomed:
        os.remove(os.path.join(output_dir, name))
        logger.info(f"removed old checkpoint {name}")
