"""Preemption as clusters do it: SIGTERM or SIGUSR1 to every process of the job (the main
process and its DataLoader workers), under python and torchrun. The run finishes its optimizer
step, saves that step once, exits with lifecycle.EXIT_PREEMPTED, and the same command started again
ends bit-identical to a run never interrupted."""
import glob
import os
import re
import signal
import time

import pytest

import lifecycle
import main
import utils
from helpers import (assert_ok, assert_same_training_state, children, environ, run_dir, run_main,
                     start_main, stop_when, wait_for, write_config, write_image_folder)

STOPPED = re.compile(r'WARNING stopped by (\S+|a signal to another process) at epoch (\d+) step '
                     r'(\d+): (saved ([^;\s]+)|nothing new to save)')
# 4 epochs of 10 steps: time to signal the run in the middle of epoch 1
ARGS = ['--opts', 'DATA.NUM_WORKERS', '2', 'TRAIN.EPOCHS', '4', 'PRINT_FREQ', '1',
        'TRAIN.KEEP_CHECKPOINTS', '0']


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp('preemption')
    data = write_image_folder(root / 'data', n_val=30)  # 23 val batches: time to signal during them
    cfg = write_config(root / 'tiny.yaml')
    straight = str(root / 'straight')
    assert_ok(run_main(root, ['--cfg', cfg, '--data-path', data, '--output', straight, *ARGS]))
    return root, data, cfg, run_dir(straight)


def logged(path, text):
    return lambda: os.path.isfile(path) and text in open(path).read()


def checkpoints(run):
    return sorted(name for name in os.listdir(run) if name.startswith(('ckpt_', '.ckpt_')))


def send_until_exit(process, signals, target, interval=0.005, timeout=60):
    """Send `signals` in turn to `target` (a pid, or -pgid for a whole process group) every
    `interval` seconds until `process` exits; returns the seconds from the first one to the
    exit. Signals keep landing while the checkpoint is written."""
    start = time.time()
    sent = 0
    while process.poll() is None:
        try:
            os.kill(target, signals[sent % len(signals)])
        except ProcessLookupError:
            pass
        sent += 1
        assert time.time() - start < timeout, "the run did not stop"
        time.sleep(interval)
    return time.time() - start


def training_run(workspace, name):
    """The training command of run `name`, its run folder and the log file to start it with."""
    root, data, cfg, _ = workspace
    out = str(root / name)
    return ['--cfg', cfg, '--data-path', data, '--output', out, *ARGS], run_dir(out), root / f'{name}.log'


def test_signals_to_the_whole_job_save_the_step_and_the_restart_ends_bit_identical(workspace):
    root, _, _, straight = workspace
    command, run, log = training_run(workspace, 'stopped')
    process = start_main(root, command, log_path=log, new_session=True)
    try:
        wait_for(logged(log, 'Train: [1/4][3/10]'), process)
        # SIGTERM then SIGUSR1, SIGTERM, ... to the main process and its loader workers, every
        # 5 ms until it has gone: several land during the save
        seconds = send_until_exit(process, [signal.SIGTERM, signal.SIGUSR1], -process.pid)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = log.read_text()
    assert process.returncode == lifecycle.EXIT_PREEMPTED, output[-3000:]
    assert 'Traceback' not in output and 'DataLoader worker' not in output, output[-3000:]
    stops = STOPPED.findall(output)
    assert len(stops) == 1, output[-3000:]
    name, epoch, step, _, saved = stops[0]
    assert name == 'SIGTERM' and epoch == '1' and 3 <= int(step) <= 10
    assert saved == os.path.join(run, f'ckpt_epoch_1_step_{step}.pth')
    # one checkpoint at the step, complete: no temporary file, nothing else written since epoch 0
    assert checkpoints(run) == ['ckpt_best.pth', 'ckpt_epoch_0.pth', f'ckpt_epoch_1_step_{step}.pth']
    assert output.strip().splitlines()[-1].startswith('preempted: stopped by SIGTERM')
    print(f"SIGTERM to exit: {seconds:.2f} s")
    assert seconds < 10

    restarted = run_main(root, command)
    assert_ok(restarted)
    assert f'auto resuming from {saved}' in restarted.stdout
    assert f'continuing at epoch 1 step {step}' in restarted.stdout
    assert_same_training_state(os.path.join(straight, 'ckpt_epoch_3.pth'),
                               os.path.join(run, 'ckpt_epoch_3.pth'))
    assert_same_training_state(os.path.join(straight, 'ckpt_best.pth'),
                               os.path.join(run, 'ckpt_best.pth'))


def test_a_signal_during_evaluation_completes_and_saves_the_epoch(workspace):
    root, _, _, straight = workspace
    command, run, log = training_run(workspace, 'in_eval')
    process = start_main(root, command, log_path=log, new_session=True)
    stop_when(process, logged(log, 'Test: [0/'), lambda: os.killpg(process.pid, signal.SIGUSR1), poll=0.002)
    output = log.read_text()
    assert process.returncode == lifecycle.EXIT_PREEMPTED, output[-3000:]
    # the evaluation ran to its end: its summary, then the epoch checkpoint, then the stop
    assert output.index(' * Acc@1') < output.index('stopped by SIGUSR1'), output[-3000:]
    stops = STOPPED.findall(output)
    assert [stop[:3] for stop in stops] == [('SIGUSR1', '1', '0')], output[-3000:]
    assert stops[0][4] == os.path.join(run, 'ckpt_epoch_0.pth')
    assert checkpoints(run) == ['ckpt_best.pth', 'ckpt_epoch_0.pth']
    assert_same_training_state(os.path.join(run, 'ckpt_epoch_0.pth'),
                               os.path.join(straight, 'ckpt_epoch_0.pth'))


def sigterm_caught(pid):
    """Whether process `pid` has a handler for SIGTERM (bit 15 of SigCgt in /proc)."""
    with open(f'/proc/{pid}/status') as f:
        caught = next(line for line in f if line.startswith('SigCgt:')).split()[1]
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def test_a_signal_before_the_first_step_saves_nothing(workspace):
    root, data, cfg, _ = workspace
    out = str(root / 'early')
    log = root / 'early.log'
    process = start_main(root, ['--cfg', cfg, '--data-path', data, '--output', out, *ARGS],
                         log_path=log)
    # the moment main.py installs its handler, before it reads data or builds the model
    stop_when(process, lambda: sigterm_caught(process.pid), lambda: process.send_signal(signal.SIGTERM),
              poll=0.001)
    output = log.read_text()
    assert process.returncode == lifecycle.EXIT_PREEMPTED, output[-3000:]
    assert STOPPED.findall(output) == [('SIGTERM', '0', '0', 'nothing new to save', '')]
    assert 'Train: [' not in output
    assert checkpoints(run_dir(out)) == []


def test_torchrun_ranks_stop_at_the_same_step_when_one_is_signalled(workspace):
    """SIGUSR1 to rank 1 alone: rank 0 learns it in the step's all-reduce, stops at the same
    step and writes the checkpoint."""
    root = workspace[0]
    command, run, log = training_run(workspace, 'torchrun')
    process = start_main(root, command, nproc=2, log_path=log)
    def signal_rank1():
        rank1 = next(pid for pid in children(process.pid) if environ(pid).get(b'RANK') == b'1')
        os.kill(rank1, signal.SIGUSR1)
    stop_when(process, logged(os.path.join(run, 'log_rank1.txt'), 'Train: [0/4][1/5]'), signal_rank1)
    output = log.read_text()
    ranks = [STOPPED.findall(open(os.path.join(run, f'log_rank{rank}.txt')).read())
             for rank in (0, 1)]
    assert [len(stops) for stops in ranks] == [1, 1], output[-3000:]
    (by0, epoch0, step0, _, saved), (by1, epoch1, step1, _, _) = ranks[0][0], ranks[1][0]
    assert (by0, by1) == ('a signal to another process', 'SIGUSR1')
    assert (epoch0, step0) == (epoch1, step1) == ('0', step0)
    assert saved == os.path.join(run, f'ckpt_epoch_0_step_{step0}.pth')
    assert checkpoints(run) == [f'ckpt_epoch_0_step_{step0}.pth']
    # both workers exit with the preempted status; torchrun itself reports a failure
    assert output.count(f'exitcode  : {lifecycle.EXIT_PREEMPTED}') == 2, output[-3000:]
    assert process.returncode == 1
    assert output.count('preempted: stopped by') == 1


def test_sigterm_to_torchrun_reaches_the_workers(workspace):
    """Kubernetes signals the container's first process, torchrun: it forwards SIGTERM to its
    workers, waits for them, and exits with status 1 (it re-raises the signal as an error)."""
    root, data, cfg, _ = workspace
    out = str(root / 'torchrun_term')
    run = run_dir(out)
    log = root / 'torchrun_term.log'
    process = start_main(root, ['--cfg', cfg, '--data-path', data, '--output', out, *ARGS],
                         nproc=2, log_path=log)
    seconds = stop_when(process, logged(os.path.join(run, 'log_rank1.txt'), 'Train: [0/4][1/5]'),
                        lambda: process.send_signal(signal.SIGTERM))
    output = log.read_text()
    print(f"SIGTERM to torchrun's exit: {seconds:.2f} s")
    stops = [STOPPED.findall(open(os.path.join(run, f'log_rank{rank}.txt')).read())
             for rank in (0, 1)]
    assert [[stop[:3] for stop in ranks] for ranks in stops] == [[stops[0][0][:3]]] * 2, output[-3000:]
    assert stops[0][0][0] == 'SIGTERM'
    assert os.path.isfile(stops[0][0][4])
    assert process.returncode == 1, output[-3000:]
    assert seconds < 20
    assert not glob.glob(os.path.join(run, '.ckpt_*'))


def test_checkpoint_names_parse_in_one_place():
    assert utils.parse_checkpoint_name('ckpt_epoch_3.pth') == (3, None)
    assert utils.parse_checkpoint_name('ckpt_epoch_3_step_7.pth') == (3, 7)
    for other in ('ckpt_best.pth', '.ckpt_epoch_3.pth.12.tmp', 'ckpt_epoch_3.pth.bak'):
        assert utils.parse_checkpoint_name(other) is None
    names = ['ckpt_epoch_3.pth', 'ckpt_epoch_3_step_10.pth', 'ckpt_epoch_4_step_2.pth',
             'ckpt_epoch_10.pth', 'ckpt_epoch_3_step_9.pth']
    in_time = sorted(names, key=lambda name: utils.parse_checkpoint_name(name).position())
    assert in_time == ['ckpt_epoch_3_step_9.pth', 'ckpt_epoch_3_step_10.pth', 'ckpt_epoch_3.pth',
                       'ckpt_epoch_4_step_2.pth', 'ckpt_epoch_10.pth']


def test_a_signal_at_the_last_batch_saves_it_and_the_restart_evaluates_it(workspace):
    """With 20 accumulation steps in a 10-batch epoch the one optimizer step is the epoch's last
    batch: the run stops there, trained but not evaluated, and the restart evaluates it."""
    root, data, cfg, _ = workspace
    args = ['--cfg', cfg, '--data-path', data, '--opts', 'TRAIN.ACCUMULATION_STEPS', '20',
            'TRAIN.EPOCHS', '2', 'PRINT_FREQ', '1', 'TRAIN.KEEP_CHECKPOINTS', '0']
    assert_ok(run_main(root, args + ['--output', str(root / 'accumulated_straight')]))
    out = str(root / 'accumulated')
    run = run_dir(out)
    log = root / 'accumulated.log'
    process = start_main(root, args + ['--output', out], log_path=log)
    stop_when(process, logged(log, 'Train: [0/2][2/10]'), lambda: process.send_signal(signal.SIGTERM))
    output = log.read_text()
    assert process.returncode == lifecycle.EXIT_PREEMPTED, output[-3000:]
    assert [stop[:3] for stop in STOPPED.findall(output)] == [('SIGTERM', '0', '10')]
    assert ' * Acc@1' not in output
    assert checkpoints(run) == ['ckpt_epoch_0_step_10.pth']

    restarted = run_main(root, args + ['--output', out])
    assert_ok(restarted)
    assert 'continuing at epoch 0 step 10' in restarted.stdout
    assert restarted.stdout.count(' * Acc@1') == 2  # epoch 0, then epoch 1
    straight = run_dir(str(root / 'accumulated_straight'))
    for name in ('ckpt_epoch_0.pth', 'ckpt_epoch_1.pth', 'ckpt_best.pth'):
        assert_same_training_state(os.path.join(straight, name), os.path.join(run, name))
