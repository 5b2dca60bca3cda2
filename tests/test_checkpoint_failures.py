"""Failures a restart cannot fix: a checkpoint that cannot be written (a real file-size limit,
a real full filesystem) and a non-finite loss under torchrun --max-restarts. Each stops the run
with one error line, leaves every complete checkpoint as it was, and is not retried."""
import os
import re
import resource
import signal
import subprocess
import uuid

import pytest

import lifecycle
import main
import utils
from models.checkpoint import read_checkpoint
from helpers import (REPO, assert_ok, main_command, run_dir, run_main, subprocess_env, write_config,
                     write_image_folder)

WRITE_ERROR = re.compile(r"error: cannot write checkpoint (ckpt_\S+\.pth) in (\S+): (.+) \((E[A-Z]+)\); "
                         r"the complete checkpoints already there are kept$")


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp('checkpoint_failures')
    return root, write_image_folder(root / 'data'), write_config(root / 'tiny.yaml')


def file_size_limit(limit):
    """preexec_fn: no file of the process may grow beyond `limit` bytes; a write past it fails
    with EFBIG (SIGXFSZ, which would kill the process instead, is ignored)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def run_limited(root, args, limit, nproc=1, torchrun_args=()):
    return subprocess.run(main_command(args, nproc, torchrun_args), cwd=REPO,
                          env=subprocess_env(root), capture_output=True, text=True, timeout=180,
                          preexec_fn=file_size_limit(limit))


def assert_complete_checkpoints_only(run):
    names = os.listdir(run)
    assert not [name for name in names if name.endswith('.tmp')], names
    for name in names:
        if utils.parse_checkpoint_name(name) or name == utils.BEST_CHECKPOINT:
            assert utils.is_training_checkpoint(read_checkpoint(os.path.join(run, name)))


def test_a_failed_checkpoint_write_stops_with_one_line_and_keeps_the_earlier_ones(workspace):
    """The epoch 1 checkpoints (~130 kB) cannot be written under a 64 kB file-size limit (logs
    and config stay well below it): exit 74, and the run goes on from epoch 0 once writes work."""
    root, data, cfg = workspace
    out = str(root / 'efbig')
    run = run_dir(out)
    args = ['--cfg', cfg, '--data-path', data, '--output', out, '--opts', 'TRAIN.EPOCHS']
    assert_ok(run_main(root, args + ['1']))
    before = {name: open(os.path.join(run, name), 'rb').read()
              for name in ('ckpt_epoch_0.pth', 'ckpt_best.pth')}

    result = run_limited(root, args + ['2'], limit=64 * 1024)
    assert result.returncode == lifecycle.EXIT_CHECKPOINT_WRITE_FAILED, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    name, folder, reason, code = WRITE_ERROR.match(lines[0]).groups()
    assert (folder, reason, code) == (run, 'File too large', 'EFBIG')
    assert name in ('ckpt_best.pth', 'ckpt_epoch_1.pth')
    assert 'Traceback' not in result.stdout + result.stderr
    assert_complete_checkpoints_only(run)
    for name, content in before.items():
        assert open(os.path.join(run, name), 'rb').read() == content, f"{name} changed"
    assert utils.auto_resume_helper(run) == os.path.join(run, 'ckpt_epoch_0.pth')

    again = run_main(root, args + ['2'])
    assert_ok(again)
    assert 'continuing at epoch 1 step 0' in again.stdout


@pytest.fixture
def small_filesystem(tmp_path):
    """A 450 kB tmpfs (room for three ~130 kB checkpoints and the logs); skips the test where
    mounting is not allowed."""
    mount_point = tmp_path / 'small_disk'
    mount_point.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=450k', f'focal_test_{uuid.uuid4().hex[:8]}',
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(['umount', str(mount_point)], check=True)


def test_a_full_disk_stops_with_one_line_and_auto_resume_finds_the_newest_complete_one(
        workspace, small_filesystem):
    root, data, cfg = workspace
    out = str(small_filesystem / 'out')
    run = run_dir(out)
    # a checkpoint after every step and none removed: the disk fills within the first epoch
    result = run_main(root, ['--cfg', cfg, '--data-path', data, '--output', out, '--opts',
                             'TRAIN.SAVE_EVERY_STEPS', '1', 'TRAIN.KEEP_CHECKPOINTS', '0'])
    assert result.returncode == lifecycle.EXIT_CHECKPOINT_WRITE_FAILED, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    name, folder, reason, code = WRITE_ERROR.match(lines[0]).groups()
    assert (folder, reason, code) == (run, 'No space left on device', 'ENOSPC')
    written = sorted((utils.parse_checkpoint_name(n).position(), n) for n in os.listdir(run)
                     if utils.parse_checkpoint_name(n))
    assert len(written) >= 2, os.listdir(run)
    assert utils.parse_checkpoint_name(name).position() > written[-1][0]  # the one that failed
    assert_complete_checkpoints_only(run)
    assert utils.auto_resume_helper(run) == os.path.join(run, written[-1][1])


@pytest.mark.slow  # test_stops covers it with workers; the slow run (pytest.ini)
def test_torchrun_non_finite_loss_is_reported_once_and_not_retried(workspace):
    """torchrun restarts the group after any failed worker; the restarted attempts find the
    failure in torchrun's store and stop before training."""
    root, data, cfg = workspace
    out = str(root / 'nan_torchrun')
    result = run_main(root, ['--cfg', cfg, '--data-path', data, '--output', out, '--opts',
                             'TRAIN.BASE_LR', '1e34', 'TRAIN.WARMUP_EPOCHS', '0',
                             'TRAIN.CLIP_GRAD', '0.0', 'TRAIN.SAVE_EVERY_STEPS', '1'],
                      nproc=2, torchrun_args=['--max-restarts', '2'])
    assert result.returncode == 1, result.stderr[-3000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    first = [line for line in ours if line.startswith('error: non-finite loss at epoch 0 step ')]
    retried = [line for line in ours if line.startswith('error: an earlier attempt of this '
                                                        'torchrun stopped with: non-finite loss')]
    assert len(first) == 1 and len(retried) == 2 and len(ours) == 3, result.stderr[-3000:]
    log = open(os.path.join(run_dir(out), 'log_rank0.txt')).read()
    assert log.count('Start training') == 1, "a restarted attempt trained again"


@pytest.mark.slow  # test_stops covers it with workers; the slow run (pytest.ini)
def test_torchrun_ranks_stop_together_when_rank_0_cannot_write(workspace):
    """Rank 0's failed write reaches rank 1 in the save's all-reduce: both exit 74, one line is
    printed, and the attempt torchrun restarts stops at start-up with the same status."""
    root, data, cfg = workspace
    out = str(root / 'efbig_torchrun')
    result = run_limited(root, ['--cfg', cfg, '--data-path', data, '--output', out, '--opts',
                                'TRAIN.EPOCHS', '1'], limit=64 * 1024, nproc=2,
                         torchrun_args=['--max-restarts', '1'])
    assert result.returncode == 1, result.stderr[-3000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert len(ours) == 2, result.stderr[-3000:]
    assert WRITE_ERROR.match(ours[0]).group(4) == 'EFBIG'
    assert ours[1] == f"error: an earlier attempt of this torchrun stopped with: {ours[0][7:]}; " \
                      f"not training again"
    # the restarted attempt's failure, as torchrun's summary lists it (a peer that torchrun stops
    # before it exits by itself is listed as signalled, so only the first failure is certain)
    assert f'exitcode  : {lifecycle.EXIT_CHECKPOINT_WRITE_FAILED}' in result.stderr
    assert_complete_checkpoints_only(run_dir(out))
