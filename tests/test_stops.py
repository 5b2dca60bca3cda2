"""Every way a run stops ends it promptly, with its documented status (lifecycle.py), and leaves no
process behind, data workers included: each stop path with DATA.NUM_WORKERS 0 and 2, in one process
and under torchrun --nproc_per_node 2, for classification; the stops whose code differs per task (the
loaders' and the evaluations' own loops) for detection and segmentation too.

Each run is a subprocess in its own session, watched: once its error line is out it must end within
EXIT_GRACE seconds (a run that printed its error and then waited on live workers used to hang there
forever), and after it ends its process group must be empty."""
import dataclasses
import glob
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from typing import Callable, Optional

import numpy as np
import pytest
from PIL import Image

import lifecycle
import utils
from helpers import REPO, main_command, subprocess_env, tagged_processes, write_config, write_image_folder
from models.checkpoint import read_checkpoint
from test_detection import TINY_DETECTION, write_coco
from test_segmentation import TINY_SEGMENTATION, write_ade_folder

# a run a stop signal reaches whenever it is sent: the tiny runs end within a second otherwise
LONG_RUN = ('TRAIN.EPOCHS', '100')
EXIT_GRACE = 20  # seconds from the error line to the end of the process (and of its workers)
RUN_LIMIT = 240  # seconds for a whole run, as a last resort
NOT_AN_IMAGE = b'not an image at all'


@dataclasses.dataclass
class Stop:
    """One way of stopping: `opts` for the config, `damage(data)` to make the data bad, `signal` sent to
    the whole job once training runs, the exit status of one process and the line it prints."""
    status: int
    line: str
    opts: tuple = ()
    damage: Optional[Callable] = None
    signal: Optional[int] = None
    file_limit: Optional[int] = None
    data_path: Optional[str] = None  # replaces --data-path (bad input before training)
    torchrun_args: tuple = ()


def unreadable(split, count=1):
    """Make the first `count` images of `split` unreadable; returns their paths."""
    def damage(data):
        paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(os.path.join(data, split))
                       for name in names)[:count]
        for path in paths:
            with open(path, 'wb') as f:
                f.write(NOT_AN_IMAGE)
        return paths
    return damage


CLASSIFICATION_STOPS = {
    'bad input before training': Stop(lifecycle.EXIT_BAD_INPUT, 'error: data folder not found: ', data_path='absent'),
    'unreadable training image': Stop(lifecycle.EXIT_BAD_INPUT, 'error: cannot read image ', damage=unreadable('train')),
    'unreadable validation image': Stop(lifecycle.EXIT_BAD_INPUT, 'error: cannot read image ',
                                        damage=unreadable('val'), opts=('DATA.MAX_BAD_SAMPLES', '3')),
    'more bad samples than allowed': Stop(lifecycle.EXIT_BAD_INPUT, 'error: 2 unreadable training images, more than',
                                          damage=unreadable('train', 2), opts=('DATA.MAX_BAD_SAMPLES', '1')),
    'non-finite loss': Stop(lifecycle.EXIT_TRAINING_FAILED, 'error: non-finite loss at epoch 0 step ',
                            opts=('TRAIN.BASE_LR', '1e34', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.CLIP_GRAD', '0.0')),
    'checkpoint cannot be written': Stop(lifecycle.EXIT_CHECKPOINT_WRITE_FAILED, 'error: cannot write checkpoint ',
                                         opts=('TRAIN.EPOCHS', '1'), file_limit=64 * 1024),
    'SIGTERM': Stop(lifecycle.EXIT_PREEMPTED, 'preempted: stopped by SIGTERM', signal=signal.SIGTERM, opts=LONG_RUN),
    'SIGUSR1': Stop(lifecycle.EXIT_PREEMPTED, 'preempted: stopped by SIGUSR1', signal=signal.SIGUSR1, opts=LONG_RUN),
    # (torchrun's workers run in sessions of their own, out of the terminal's reach; torchrun passes Ctrl-C on)
    'Ctrl-C': Stop(lifecycle.EXIT_INTERRUPTED, 'interrupted: stopped by Ctrl-C', signal=signal.SIGINT, opts=LONG_RUN),
}
EARLIER_ATTEMPT = Stop(lifecycle.EXIT_TRAINING_FAILED, 'error: an earlier attempt of this torchrun stopped with: ',
                       opts=CLASSIFICATION_STOPS['non-finite loss'].opts, torchrun_args=('--max-restarts', '1'))


def terminal_like(file_limit):
    """The launched command's set-up: Ctrl-C's default action, as in a terminal (a shell's background job
    ignores SIGINT, and Python keeps an ignored SIGINT ignored), and the file size limit if any."""
    def apply():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if file_limit:
            file_size_limit(file_limit)()
    return apply


def file_size_limit(limit):
    def apply():  # a write past the limit fails with EFBIG (SIGXFSZ, which would kill, is ignored)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def job_processes(tag):
    """'pid: command' of every process whose environment carries this run's tag: the launched command,
    torchrun's workers (each in its own session) and every data worker, wherever they were reparented."""
    return tagged_processes('FOCAL_TEST_RUN', tag)


def signal_job(tag, signum):
    """`signum` to every process of the job, as SLURM and Kubernetes send a stop signal."""
    for entry in job_processes(tag):
        try:
            os.kill(int(entry.split(':', 1)[0]), signum)
        except ProcessLookupError:
            pass


def run_until_stopped(tmp_path, args, stop, nproc):
    """Run main.py (or torchrun) as `stop` says; returns (exit status, stdout, stderr)."""
    stdout_path, stderr_path = tmp_path / 'stdout.txt', tmp_path / 'stderr.txt'
    tag = uuid.uuid4().hex
    with open(stdout_path, 'w') as stdout, open(stderr_path, 'w') as stderr:
        process = subprocess.Popen(main_command(args, nproc, stop.torchrun_args), cwd=REPO,
                                   env=dict(subprocess_env(tmp_path), FOCAL_TEST_RUN=tag), stdout=stdout,
                                   stderr=stderr, start_new_session=True,
                                   preexec_fn=terminal_like(stop.file_limit))
    start, signalled, error_seen = time.time(), False, None
    try:
        while process.poll() is None:
            now = time.time()
            assert now - start < RUN_LIMIT, f"the run did not stop within {RUN_LIMIT} s"
            text = stderr_path.read_text()
            if error_seen is None and stop.line in text:
                error_seen = now
            assert error_seen is None or now - error_seen < EXIT_GRACE, \
                f"the run printed its error and then did not end: {text[-2000:]}"
            if stop.signal is not None and not signalled and 'Train: [0/' in stdout_path.read_text():
                if stop.signal == signal.SIGINT:  # Ctrl-C: the terminal's foreground process group
                    os.killpg(process.pid, signal.SIGINT)
                else:
                    signal_job(tag, stop.signal)
                signalled = True
            time.sleep(0.05)
        # what the launched command leaves (orphaned torchrun workers, data workers) must end as promptly
        deadline = time.time() + EXIT_GRACE
        while job_processes(tag) and time.time() < deadline:
            time.sleep(0.05)
        left = job_processes(tag)
        assert not left, f"processes left behind: {left}"
    finally:
        signal_job(tag, signal.SIGKILL)
        process.wait()
    return process.returncode, stdout_path.read_text(), stderr_path.read_text()


def check_stop(tmp_path, args, stop, nproc, out):
    status, stdout, stderr = run_until_stopped(tmp_path, args, stop, nproc)
    # no traceback through this code base (torchrun prints its own when a worker fails)
    assert f'File "{REPO}' not in stderr and (nproc > 1 or 'Traceback' not in stderr), stderr[-3000:]
    assert stop.line in stderr, f"exit status {status}; stderr: {stderr[-3000:]}; stdout: {stdout[-2000:]}"
    if nproc == 1:
        assert status == stop.status, stderr[-3000:]
    elif stop.signal is None:  # torchrun exits with 1 after any failed worker; its summary lists their statuses
        assert status != 0 and f'exitcode  : {stop.status}' in stderr, stderr[-3000:]
    else:  # a signal to the job reaches torchrun too, which then exits with 1 and no summary
        assert status != 0, stderr[-3000:]
    runs = glob.glob(os.path.join(out, '*', 'default'))  # OUTPUT/MODEL.NAME/TAG, if the run got that far
    run = runs[0] if runs else None
    if run is not None:  # no half-written checkpoint, whatever stopped the run
        for name in os.listdir(run):
            assert not name.endswith('.tmp'), name
            if utils.parse_checkpoint_name(name) or name == utils.BEST_CHECKPOINT:
                assert utils.is_training_checkpoint(read_checkpoint(os.path.join(run, name)))
    if stop.status == lifecycle.EXIT_PREEMPTED:
        assert run is not None and any(utils.parse_checkpoint_name(name) for name in os.listdir(run)), \
            f'the step was not saved: {stderr[-2000:]}'
    return stdout, stderr


def classification_case(tmp_path, stop, workers):
    data = write_image_folder(tmp_path / 'data', n_train=8, n_val=3)
    if stop.damage is not None:
        stop.damage(data)
    cfg = write_config(tmp_path / 'tiny.yaml')
    out = str(tmp_path / 'out')
    args = ['--cfg', cfg, '--data-path', stop.data_path or data, '--output', out,
            '--opts', 'DATA.NUM_WORKERS', str(workers), 'DATA.BATCH_SIZE', '2', *stop.opts]
    return args, out


# without workers, the case that never hung, in the slow run only (pytest.ini)
WORKERS = [pytest.param(0, id='no workers', marks=pytest.mark.slow), pytest.param(2, id='2 workers')]


@pytest.mark.parametrize('nproc', [1, 2], ids=['one process', 'torchrun 2'])
@pytest.mark.parametrize('workers', WORKERS)
@pytest.mark.parametrize('name', CLASSIFICATION_STOPS)
def test_classification_stops(tmp_path, name, workers, nproc):
    stop = CLASSIFICATION_STOPS[name]
    args, out = classification_case(tmp_path, stop, workers)
    check_stop(tmp_path, args, stop, nproc, out)


@pytest.mark.parametrize('workers', WORKERS)
def test_an_attempt_after_a_failed_one_stops_at_once(tmp_path, workers):
    args, out = classification_case(tmp_path, EARLIER_ATTEMPT, workers)
    _, stderr = check_stop(tmp_path, args, EARLIER_ATTEMPT, 2, out)
    assert 'error: non-finite loss at epoch 0 step ' in stderr


def dense_case(tmp_path, task, stop, workers):
    if task == 'detection':
        data = write_coco(tmp_path / 'coco', splits=(('train', 6), ('val', 4)))
        config = TINY_DETECTION
    else:
        data = write_ade_folder(tmp_path / 'ade', counts=(('training', 6), ('validation', 4)))
        config = TINY_SEGMENTATION
    if stop.damage is not None:
        stop.damage(os.path.join(data, 'train2017' if task == 'detection' else os.path.join('images', 'training')))
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text(config)
    out = str(tmp_path / 'out')
    # two crops a step: UPerNet's pooling module normalises over the batch
    return ['--cfg', str(cfg), '--data-path', data, '--output', out, '--opts', 'DATA.NUM_WORKERS', str(workers),
            'DATA.BATCH_SIZE', '2', 'TEST.MULTI_SCALE', 'False', *stop.opts], out


DENSE_STOPS = {  # (ADE20K's loader reads an image and its label: 'cannot read <file>')
    'unreadable training image': Stop(lifecycle.EXIT_BAD_INPUT, 'error: cannot read ', damage=unreadable('')),
    'unreadable validation image': Stop(lifecycle.EXIT_BAD_INPUT, 'error: cannot read '),
    'SIGTERM': Stop(lifecycle.EXIT_PREEMPTED, 'preempted: stopped by SIGTERM', signal=signal.SIGTERM, opts=LONG_RUN),
}


# Detection under torchrun in the default run; one process (the classification cases cover its exit
# status) and segmentation (the same loop and loader assembly as detection) in the slow run only
@pytest.mark.parametrize('name', DENSE_STOPS)
@pytest.mark.parametrize('task, nproc', [
    pytest.param('detection', 2, id='detection-torchrun 2'),
    pytest.param('detection', 1, id='detection-one process', marks=pytest.mark.slow),
    pytest.param('segmentation', 2, id='segmentation-torchrun 2', marks=pytest.mark.slow),
    pytest.param('segmentation', 1, id='segmentation-one process', marks=pytest.mark.slow)])
def test_dense_task_stops_with_workers(tmp_path, task, nproc, name):
    stop = DENSE_STOPS[name]
    args, out = dense_case(tmp_path, task, stop, workers=2)
    if name == 'unreadable validation image':
        folder = os.path.join(args[args.index('--data-path') + 1],
                              'val2017' if task == 'detection' else os.path.join('images', 'validation'))
        unreadable('')(folder)
    check_stop(tmp_path, args, stop, nproc, out)


def test_a_killed_training_process_takes_its_data_workers_with_it(tmp_path):
    """SIGKILL to the training process alone (the OOM killer, a node agent): its data workers, which
    ignore the job's stop signals, die with it at once through the parent-death signal instead of living
    on until DataLoader's own watchdog looks, seconds later."""
    args, _ = classification_case(tmp_path, Stop(0, ''), workers=2)
    tag = uuid.uuid4().hex
    with open(tmp_path / 'stdout.txt', 'w') as stdout:
        process = subprocess.Popen(main_command(args), cwd=REPO, env=dict(subprocess_env(tmp_path), FOCAL_TEST_RUN=tag),
                                   stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + RUN_LIMIT
        while 'Train: [0/' not in (tmp_path / 'stdout.txt').read_text():
            assert process.poll() is None and time.time() < deadline, (tmp_path / 'stdout.txt').read_text()
            time.sleep(0.05)
        workers = [entry for entry in job_processes(tag) if not entry.startswith(f'{process.pid}:')]
        assert len(workers) == 2, workers
        process.kill()
        process.wait()
        deadline = time.time() + 2
        while job_processes(tag) and time.time() < deadline:
            time.sleep(0.02)
        assert not job_processes(tag), job_processes(tag)
    finally:
        signal_job(tag, signal.SIGKILL)


def test_workers_of_an_iterator_an_error_keeps_alive_do_not_hold_the_exit(tmp_path):
    """A script (or a test) whose loop over a Loader ended in an error keeps the iterator alive in the
    error's traceback; its workers ignore SIGTERM, so the interpreter's exit, which terminates and joins
    them, would wait forever: data.loaders shuts them down first."""
    script = tmp_path / 'kept_error.py'
    script.write_text(f"""\
import sys
sys.path.insert(0, {REPO!r})
import torch
from data.loaders import LoaderSettings, build_loaders
class SecondIsBad(torch.utils.data.Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, index):
        if index == 1:
            raise ValueError('sample 1 is bad')
        return torch.zeros(1)
settings = LoaderSettings(batch_size=1, num_workers=2, pin_memory=False, seed=0, max_bad_samples=0,
                          steps_per_epoch=0, rank=0, world_size=1)
_, loader = build_loaders(settings, None, SecondIsBad(), 'a test')
kept = []
try:
    for batch in loader:
        pass
except ValueError as error:
    kept.append(error)
print('done')
""")
    result = subprocess.run([sys.executable, str(script)], env=subprocess_env(tmp_path), capture_output=True,
                            text=True, timeout=120, start_new_session=True)
    assert result.returncode == 0 and result.stdout == 'done\n', result.stderr[-2000:]


def test_a_stop_signal_to_a_worker_before_its_set_up_does_not_kill_it(tmp_path):
    """SLURM signals every process of the job: a worker forked a moment before must not die of the
    signal's default action before `_worker_init` ignores it (each worker here signals itself at once)."""
    script = tmp_path / 'early_signal.py'
    script.write_text(f"""\
import os, signal, sys
sys.path.insert(0, {REPO!r})
import torch
from data.loaders import LoaderSettings, build_loaders
settings = LoaderSettings(batch_size=2, num_workers=2, pin_memory=False, seed=0, max_bad_samples=0,
                          steps_per_epoch=0, rank=0, world_size=1)
_, loader = build_loaders(settings, None, torch.arange(8.0), 'a test')
os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), signal.SIGTERM))
print(torch.cat(list(loader)).tolist())
""")
    result = subprocess.run([sys.executable, str(script)], env=subprocess_env(tmp_path), capture_output=True,
                            text=True, timeout=120, start_new_session=True)
    assert result.returncode == 0 and result.stdout == f'{[float(i) for i in range(8)]}\n', result.stderr[-2000:]


def test_a_process_that_lost_its_peer_waits_for_the_launcher_to_stop_it(tmp_path):
    """torchrun names the first worker it sees exit as the root cause: a rank that only saw its peer go
    (rank 0 stopped on bad input) must not exit before the launcher stops it, or the run's report shows
    its 1 instead of the 2 of the error that stopped the run. Without a launcher's signal it stops
    waiting at the end of a bounded wait (the second stop, 1 s)."""
    script, returns = tmp_path / 'lost_peer.py', tmp_path / 'returns.txt'
    script.write_text(f"""\
import sys, time, types
sys.path.insert(0, {REPO!r})
import lifecycle
def main(config, stop):
    raise RuntimeError('[gloo] Connection closed by peer [127.0.0.1]:29500')
for wait in (60.0, 1.0):
    lifecycle.PEER_STOP_WAIT_SECONDS = wait
    status = lifecycle.exit_status(main, types.SimpleNamespace(EVAL_MODE=False, THROUGHPUT_MODE=False))
    with open({str(returns)!r}, 'a') as f:
        f.write(f'{{status}} {{time.time()}}\\n')
""")
    process = subprocess.Popen([sys.executable, str(script)], env=dict(subprocess_env(tmp_path), WORLD_SIZE='2', RANK='1'),
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines, signalled = [], None
        for _ in range(2):
            lines.append(process.stderr.readline())
            if signalled is None:
                time.sleep(1.0)
                signalled = time.time()
                os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        process.kill()
        stderr = process.communicate()[1]
    assert all(line.startswith('error: another process of this run stopped') for line in lines), lines
    (first, first_time), (second, second_time) = [line.split() for line in returns.read_text().splitlines()]
    assert first == second == str(lifecycle.EXIT_TRAINING_FAILED)
    assert signalled < float(first_time) < signalled + 5, "it returned before its launcher stopped it"
    assert 0.9 < float(second_time) - float(first_time) < 10
    assert process.returncode == 0, stderr
