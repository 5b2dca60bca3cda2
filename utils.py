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

from models import backbone
from models.checkpoint import CheckpointError, atomic_write, error_line, read_checkpoint, resolve


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
    whatever wrote it (a step, the end of an epoch, a stop signal), with the names of the classes in
    label order ('classes'), and `load_state_dict()` restores it.

    On disk the position keeps the original's convention: 'epoch' E with 'step' None is the end
    of epoch E, evaluated; 'step' S is S batches into epoch E (S = the epoch's length: trained,
    not yet evaluated).
    """

    def __init__(self, model, optimizer, lr_scheduler, loss_scaler, unreadable, class_names=(), model_ema=None):
        self.model = model
        self.class_names = list(class_names)
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
            'classes': self.class_names,
        }
        if self.model_ema is not None:
            state['model_ema'] = self.model_ema.module.state_dict()
        return state

    def load_state_dict(self, state_dict, steps_per_epoch=None):
        """Restore a training checkpoint but its weights, which `load_checkpoint` has loaded through the
        one weights path. A step beyond `steps_per_epoch` (the epoch got shorter) means the epoch's
        training is done. The torch objects raise ValueError, KeyError or RuntimeError when the
        checkpoint does not fit them."""
        self.optimizer.load_state_dict(state_dict['optimizer'])
        self.lr_scheduler.load_state_dict(state_dict['lr_scheduler'])
        if state_dict.get('scaler'):
            self.loss_scaler.load_state_dict(state_dict['scaler'])
        epoch, step = state_dict['epoch'], state_dict.get('step')
        if step is None:  # also the original's checkpoints, which have no 'step'
            self.epoch, self.step = epoch + 1, 0
        else:
            self.epoch = epoch
            self.step = step if steps_per_epoch is None else min(step, steps_per_epoch)
        self.max_accuracy = state_dict['max_accuracy']
        self.unreadable.load_state_dict(state_dict.get('bad_samples', []))


def checkpoint_to_resume(config, logger):
    """The checkpoint a run starts from ('' for none): a restarted training command continues from
    its own newest checkpoint whatever --resume says (as the original), with TRAIN.AUTO_RESUME; an
    evaluation evaluates the file it was given."""
    evaluating = config.EVAL_MODE or config.THROUGHPUT_MODE
    if not config.TRAIN.AUTO_RESUME or (evaluating and config.MODEL.RESUME):
        return config.MODEL.RESUME
    resume_file = auto_resume_helper(config.OUTPUT, logger)
    if not resume_file:
        logger.info(f"no checkpoint found in {config.OUTPUT}, ignoring auto resume")
        return config.MODEL.RESUME
    if config.MODEL.RESUME:
        logger.warning(f"auto-resume changing resume file from {config.MODEL.RESUME} to {resume_file}")
    logger.info(f"auto resuming from {resume_file}")
    return resume_file


def load_checkpoint(path, config, state, logger, steps_per_epoch=None):
    """Resume from the checkpoint at `path`: the model always, and, when the file is one of our
    training checkpoints and we are training, the whole TrainingState. A released or
    weights-only file just sets the weights (training then starts at epoch 0). A training checkpoint
    of other classes than the data's (another class folder, another order) is refused: its labels
    would mean other things."""
    logger.info(f"==> Resuming from {path}")
    contents = read_checkpoint(resolve_logged(path, logger))
    backbone.load_weights(state.model, contents, path, adapt=False)
    if config.EVAL_MODE or config.THROUGHPUT_MODE:
        return
    if not is_training_checkpoint(contents):
        logger.info(f"{path} holds weights only: training starts at epoch 0")
        return
    if contents.get('classes') and state.class_names and list(contents['classes']) != state.class_names:
        differing = [(old, new) for old, new in zip(contents['classes'], state.class_names) if old != new]
        raise CheckpointError(f"{path} was trained on other classes than the data's: {len(contents['classes'])} "
                              f"classes against {len(state.class_names)}"
                              + (f", e.g. {differing[0][0]!r} where the data has {differing[0][1]!r}"
                                 if differing else ''))
    if state.model_ema is not None:
        if 'model_ema' in contents:
            backbone.load_weights(state.model_ema.module, contents['model_ema'], path, adapt=False)
        else:
            state.model_ema.module.load_state_dict(state.model.state_dict())
            logger.info(f"{path} has no EMA weights: EMA restarts from the resumed model")
    try:
        state.load_state_dict(contents, steps_per_epoch)
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot restore the training state: "
                              f"{error_line(err)}") from None
    logger.info(f"=> resumed {path}: continuing at epoch {state.epoch} step {state.step}, "
                f"best so far {state.max_accuracy:.3f}")


def load_pretrained(config, model, logger):
    """--pretrained: the weights of MODEL.PRETRAINED into the Focal Transformer that `model` is (a
    classifier) or holds (a detector's or segmenter's backbone), adapted to its geometry
    (models.backbone.load_pretrained); what happened to each tensor is logged."""
    path = config.MODEL.PRETRAINED
    logger.info(f"==> Loading pretrained weights from {path}")
    report = backbone.load_pretrained(model, resolve_logged(path, logger))
    logger.info(f"=> {path}: {report.summary()}")
    for line in report.details():
        logger.debug(line)


def resolve_logged(location, logger):
    """The local file of a checkpoint location (models.checkpoint.resolve), the file a URL is cached as
    named in the log."""
    path = resolve(location)
    if path != location:
        logger.info(f"{location} is read from {path}")
    return path


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
