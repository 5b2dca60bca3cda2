# --------------------------------------------------------
# Focal Transformer: how a run stops
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""How a run of main.py stops, and the exit status it stops with.

Exit status (errors as one `error: ...` line on stderr, from rank 0 alone when every process stops
for the same reason):
    0  done
    1  training failed: a non-finite loss, or another process of the run stopped
    2  bad input: config, data, checkpoint, output folder
   74  a checkpoint could not be written (disk full, I/O error); the complete ones are kept
   75  preempted by SIGTERM/SIGUSR1 after saving: run the same command again to continue
  130  interrupted (Ctrl-C)
Under torchrun, a failure (1, 74) is also left in torchrun's store: the attempts that --max-restarts
starts after it stop at once with the same status instead of training into it again. torchrun itself
exits with 1 after any failed worker or a signal to itself; its summary lists the workers' statuses and
names the first to exit as the root cause, so a process that only lost its peer waits for torchrun to
stop it (up to PEER_STOP_WAIT_SECONDS) before it exits with 1.

Preemption: SIGTERM or SIGUSR1 to the job (every process, data workers included, as SLURM and
Kubernetes send it; or to torchrun, which forwards SIGTERM) lets the current optimizer step finish;
all processes agree on that step (`RunContext.stop_requested`), rank 0 saves it atomically as
ckpt_epoch_E_step_S.pth, the log says where, and the run exits with 75. A signal during evaluation
lets it finish and saves the epoch; one before the first step saves nothing.

However a run stops, its data workers stop with it: the training loop shuts them down on its way
out (`data.loaders.Loader.shut_down`), and a worker dies with its process (`data.loaders`).
"""
import argparse
import contextlib
import os
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist

from config import ConfigError
from data import DataError
from data.loaders import STOP_SIGNALS
from distributed import is_distributed, reduce_sum
from models.checkpoint import CheckpointError, error_line
from utils import BEST_CHECKPOINT, CheckpointWriteError, parse_checkpoint_name, prune_checkpoints, save_checkpoint

EXIT_TRAINING_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_CHECKPOINT_WRITE_FAILED = 74  # EX_IOERR of sysexits.h
EXIT_PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h: temporary failure, run me again
EXIT_INTERRUPTED = 128 + signal.SIGINT  # the shell's status of a process ended by Ctrl-C
# torchrun's store key under which a failed attempt leaves its exit status and message
FAILURE_KEY = 'focal_transformer/training_failed'
# How gloo and NCCL report that a peer process of the group is gone, in the error of a collective.
PEER_GONE = ('Connection closed by peer', 'Connection reset by peer', 'NCCL communicator was aborted')
# How long a process that only saw a peer go waits for its launcher's stop signal before it exits
# (torchrun polls its workers every 0.1 s and SIGTERMs the rest once one has exited).
PEER_STOP_WAIT_SECONDS = 5.0


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line and EXIT_BAD_INPUT (main.py, predict.py)."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


class OutputFolderError(Exception):
    """The output folder cannot be created or written; the message is one line."""


BAD_INPUT_ERRORS = (ConfigError, DataError, CheckpointError, OutputFolderError)


class NonFiniteLossError(Exception):
    """The loss (or, without a gradient scaler, the gradient norm) became NaN or infinite."""


class Preempted(Exception):
    """The job was asked to stop; the message says what was saved."""


class EarlierAttemptFailed(Exception):
    """A restarted torchrun attempt found that an earlier attempt of the same torchrun failed."""

    def __init__(self, message, exit_status):
        super().__init__(message)
        self.exit_status = exit_status


@contextlib.contextmanager
def output_folder(path, rank):
    """Create the run's folder and prove it can be written (a one-line OutputFolderError if not); a run
    that then stops on bad input before its first checkpoint leaves no folder behind."""
    existed = os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write_test.{os.getpid()}')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as err:
        raise OutputFolderError(f"output folder {path} cannot be written: {err.strerror or err}") from None
    try:
        yield
    except BAD_INPUT_ERRORS:
        if rank == 0 and not existed and not any(parse_checkpoint_name(name) or name == BEST_CHECKPOINT
                                                 for name in os.listdir(path)):
            shutil.rmtree(path, ignore_errors=True)
        raise


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


def any_process(flags, device):
    """For each flag, whether it holds on any process: one all-reduce for all of them, so that
    every process takes the same decision at the same step."""
    if not is_distributed():
        return [bool(flag) for flag in flags]
    counts = reduce_sum(torch.tensor([float(bool(flag)) for flag in flags], device=device))
    return [count > 0 for count in counts.tolist()]


def check_earlier_failure(store):
    """Stop at once if an earlier attempt of this torchrun failed (failures_recorded)."""
    if store.check([FAILURE_KEY]):
        exit_status, message = store.get(FAILURE_KEY).decode().split(' ', 1)
        raise EarlierAttemptFailed(f"an earlier attempt of this torchrun stopped with: {message}; "
                                   f"not training again", int(exit_status))


@contextlib.contextmanager
def failures_recorded(store, rank):
    """Leave rank 0's account of a failure (1, 74) in torchrun's store, which outlives the attempt:
    torchrun restarts the group after any failed worker (--max-restarts), and the restarted attempt then
    stops (check_earlier_failure) instead of training into it again."""
    try:
        yield
    except (NonFiniteLossError, CheckpointWriteError) as err:
        if store is not None and rank == 0:
            status = EXIT_TRAINING_FAILED if isinstance(err, NonFiniteLossError) else EXIT_CHECKPOINT_WRITE_FAILED
            store.set(FAILURE_KEY, f'{status} {err}')
        raise


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


def wait_for_launcher(stop, seconds):
    """Wait up to `seconds` for the launcher's stop signal (recorded in `stop`; without StopSignals it
    ends the process). A launcher names the first process it sees exit as the root cause of a failed
    run: one that had only lost its peer and exited first would hide the error that stopped the run."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (stop is None or stop.received is None):
        time.sleep(0.05)


def exit_status(main, config):
    """Run `main(config, stop)` (`stop`: the StopSignals of a training run, None otherwise) and return
    its exit status, each way of stopping reported in one line (see the module docstring)."""
    def report(line):  # every process stops for the same reason: say it once (torchrun sets RANK)
        if int(os.environ.get('RANK', 0)) == 0:
            print(line, file=sys.stderr)

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
        except KeyboardInterrupt:
            report("interrupted: stopped by Ctrl-C; the checkpoints saved before it are kept")
            return EXIT_INTERRUPTED
        except RuntimeError as err:  # in a collective, or while joining the group
            if not (int(os.environ.get('WORLD_SIZE', 1)) > 1 and any(sign in str(err) for sign in PEER_GONE)):
                raise
            print(f"error: another process of this run stopped (its error is above); stopping "
                  f"rank {os.environ.get('RANK')} too", file=sys.stderr)
            wait_for_launcher(stop, PEER_STOP_WAIT_SECONDS)
            return EXIT_TRAINING_FAILED
        finally:
            if is_distributed():
                dist.destroy_process_group()
