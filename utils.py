# --------------------------------------------------------
# Focal Transformer: checkpoints and small distributed helpers
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""Reading, writing and finding checkpoints, and the few distributed helpers main.py needs.

A checkpoint file is one of
  * a training checkpoint written by `save_checkpoint`: a `TrainingState.state_dict()` (model,
    optimizer, lr_scheduler, scaler, epoch, step, max_accuracy, bad_samples, and the EMA weights
    when EMA is on) and the config;
  * a released model as distributed: a raw state dict that still carries the reference's
    integer index buffers;
  * a `{'model': state_dict}` dict (the original repository's and Swin's layout).
Every way a checkpoint can be unusable raises `CheckpointError` with a one-line message naming
the file, and for an architecture mismatch the offending keys; a checkpoint that cannot be
written raises `CheckpointWriteError` naming the folder and the OS error.
"""
import errno
import os
import pickle
import re
import resource
import time
import typing
import urllib.error
import urllib.parse
import uuid
from xml.etree import ElementTree

import torch
import torch.distributed as dist

from models.focal_transformer import checkpoint_filter_fn
from models.pretrained import transfer_weights
from models.unwrap import unwrap_state_dict


class InputError(Exception):
    """Bad input the user can fix (a file, a folder, a value); the message is one line."""


class CheckpointError(InputError):
    """A checkpoint that is missing, unreadable, incomplete or made for another model."""


# ckpt_epoch_{E}.pth is written after epoch E; ckpt_epoch_{E}_step_{S}.pth after S batches of it.
CHECKPOINT_NAME = re.compile(r'^ckpt_epoch_(\d+)(?:_step_(\d+))?\.pth$')
BEST_CHECKPOINT = 'ckpt_best.pth'
TRAINING_STATE_KEYS = ('model', 'optimizer', 'lr_scheduler', 'epoch', 'max_accuracy')
# How many offending keys an architecture-mismatch message lists before "(+N more)".
KEYS_SHOWN = 4
# How much of an HTTP error's body is read for an error code.
MAX_ERROR_BODY = 64 * 1024


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
def resolve_checkpoint_path(location):
    """A local path as given; an http(s):// or file:// URL is downloaded once into the torch hub
    cache (`torch.hub.get_dir()/checkpoints`) and the cached path returned."""
    scheme = urllib.parse.urlparse(location).scheme
    if scheme not in ('http', 'https', 'file'):
        return location
    cache_dir = os.path.join(torch.hub.get_dir(), 'checkpoints')
    filename = os.path.basename(urllib.parse.urlparse(location).path)
    if not filename:
        raise CheckpointError(f"checkpoint URL {location} does not end in a file name")
    cached = os.path.join(cache_dir, filename)
    if not os.path.exists(cached):
        os.makedirs(cache_dir, exist_ok=True)
        try:  # writes a temporary file and renames it: an interrupted download leaves no file
            torch.hub.download_url_to_file(location, cached, progress=False)
        except urllib.error.HTTPError as err:
            raise CheckpointError(f"cannot download checkpoint {location}: the server answered "
                                  f"{_http_failure(err)}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, 'reason', err)
            raise CheckpointError(f"cannot download checkpoint {location}: {reason}") from None
    return cached


def _http_failure(err):
    """'HTTP <code> <reason>', followed by the error code and message of an Azure/S3-style XML
    body (<Error><Code>PublicAccessNotPermitted</Code><Message>...</Message></Error>)."""
    failure = f"HTTP {err.code} {err.reason}"
    try:
        error = ElementTree.fromstring(err.read(MAX_ERROR_BODY))
    except (ElementTree.ParseError, OSError, ValueError):
        return failure
    code = (error.findtext('Code') or '').strip()
    message = (error.findtext('Message') or '').strip().splitlines()
    if code:
        failure += f": {code}" + (f" ({message[0].strip()})" if message else '')
    return failure


def _torch_load(path):
    """torch.load restricted to tensors and plain containers. The one exception: the original
    repository's training checkpoints pickle their yacs config, which the restricted loader
    cannot rebuild; those (and only those) are loaded unrestricted, as the original did."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        if 'CfgNode' not in str(err):
            raise
        return torch.load(path, map_location='cpu', weights_only=False)


def _load_failure(err):
    """The informative part of torch.load's error, on one short line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        # the restricted unpickler wraps its finding in a paragraph of advice
        if line.endswith('WeightsUnpickler error:') and index + 1 < len(lines):
            return lines[index + 1]
    first = lines[0].split('. ')[0] if lines else ''
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def read_checkpoint(location):
    """Load a checkpoint file (or URL) onto the CPU; any failure is a one-line CheckpointError."""
    path = resolve_checkpoint_path(location)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = _torch_load(path)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated, damaged "
                              f"or another format): {_load_failure(err)}") from None
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint: it holds a "
                              f"{type(checkpoint).__name__}, not a dict of tensors")
    return checkpoint


def model_state_dict(checkpoint, path):
    """The plain model weights of any accepted layout (see models.unwrap.unwrap_state_dict)."""
    try:
        return unwrap_state_dict(checkpoint)
    except ValueError as err:
        raise CheckpointError(f"{path} is not a model checkpoint ({err}): expected a state dict of "
                              f"tensors or a dict with a 'model' state dict") from None


def _listed(keys):
    keys = sorted(keys)
    shown = ', '.join(keys[:KEYS_SHOWN])
    return shown + (f' (+{len(keys) - KEYS_SHOWN} more)' if len(keys) > KEYS_SHOWN else '')


def check_fits_model(state_dict, model, path):
    """Raise a CheckpointError naming the missing, unexpected and wrong-shape keys, if any."""
    expected = model.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    wrong_shape = [f'{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}'
                   for key in sorted(expected.keys() & state_dict.keys())
                   if state_dict[key].shape != expected[key].shape]
    problems = []
    if missing:
        problems.append(f'missing keys: {_listed(missing)}')
    if unexpected:
        problems.append(f'unexpected keys: {_listed(unexpected)}')
    if wrong_shape:
        problems.append(f'wrong shape (checkpoint vs model): {_listed(wrong_shape)}')
    if problems:
        raise CheckpointError(f"{path} does not fit this model (another architecture?): "
                              + '; '.join(problems))


def load_model_weights(model, checkpoint, path):
    """Load the weights of `checkpoint` into `model` strictly, whatever the accepted layout."""
    state_dict = checkpoint_filter_fn(model_state_dict(checkpoint, path), model)
    check_fits_model(state_dict, model, path)
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
    checkpoint = read_checkpoint(path)
    load_model_weights(state.model, checkpoint, path)
    if config.EVAL_MODE or config.THROUGHPUT_MODE:
        return
    if not is_training_checkpoint(checkpoint):
        logger.info(f"{path} holds weights only: training starts at epoch 0")
        return
    if state.model_ema is not None:
        if 'model_ema' in checkpoint:
            check_fits_model(checkpoint['model_ema'], state.model_ema.module, path)
        else:
            logger.info(f"{path} has no EMA weights: EMA restarts from the resumed model")
    try:
        state.load_state_dict(checkpoint, steps_per_epoch)
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot restore the training state: "
                              f"{str(err).strip().splitlines()[0]}") from None
    logger.info(f"=> resumed {path}: continuing at epoch {state.epoch} step {state.step}, "
                f"best Acc@1 so far {state.max_accuracy:.3f}")


def load_pretrained(config, model, logger):
    """Weights only, for fine-tuning: models.pretrained.transfer_weights copies what fits, resizes
    the focal tables to a new window, starts new tensors (e.g. another head) fresh, and reports."""
    path = config.MODEL.PRETRAINED
    logger.info(f"==> Loading pretrained weights from {path}")
    state_dict = model_state_dict(read_checkpoint(path), path)
    try:
        state_dict, report = transfer_weights(state_dict, model)
    except ValueError as err:
        raise CheckpointError(f"{path}: {str(err).strip().splitlines()[0]}") from None
    check_fits_model(state_dict, model, path)
    model.load_state_dict(state_dict, strict=True)
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
def atomic_write(path, write):
    """Call `write(f)` on a temporary binary file in the same folder, flush it to disk, then
    rename it to `path`: a kill at any instant leaves either the previous file or the complete
    new one under `path`, never a truncated one."""
    folder, name = os.path.split(path)
    tmp_path = os.path.join(folder, f'.{name}.{os.getpid()}.tmp')
    try:
        with open(tmp_path, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    dir_fd = os.open(folder or '.', os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------
def is_distributed():
    return dist.is_available() and dist.is_initialized()


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


def memory_mb(device):
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set on the CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, kB on Linux
