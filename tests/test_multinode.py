"""Several nodes, as get_started.md runs them: two torchrun agents on this machine
(`--nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint HOST:PORT --rdzv_id ID`)
train to the weights of one agent with two processes and validate to the accuracy of one
process; with `--max-restarts 1`, a worker of one agent killed mid-epoch brings both agents back
and the run ends bit-identical to an uninterrupted one."""
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

from helpers import (MAIN, REPO, assert_ok, load_weights, run_dir, run_main, subprocess_env,
                     write_config, write_image_folder)
from test_resume import assert_same_training_state, children, environ, reached, wait_for

# 42 training images, 4 per batch, 2 processes: 5 steps of ~0.1 s per epoch; a checkpoint every
# 2 steps gives the elastic restart a point inside an epoch to resume from. 5 epochs leave the
# elastic test time to kill a worker before the run ends.
EPOCHS = 5
TRAIN_OPTS = ['TRAIN.SAVE_EVERY_STEPS', '2', 'TRAIN.EPOCHS', str(EPOCHS)]
LAST_CHECKPOINT = f'ckpt_epoch_{EPOCHS - 1}.pth'
ACCURACY_LINE = re.compile(r' \* Acc@1 [\d.]+ Acc@5 [\d.]+')


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def start_two_nodes(tmp_path, args, name, torchrun_args=()):
    """The two agents of get_started.md's rendezvous command, one process each, both on this
    machine; returns their Popen objects (output in tmp_path/name_node<N>.log)."""
    endpoint = f'127.0.0.1:{free_port()}'
    agents = []
    for node in range(2):
        command = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2',
                   '--nproc_per_node', '1', '--rdzv_backend', 'c10d', '--rdzv_endpoint', endpoint,
                   '--rdzv_id', name, *torchrun_args, MAIN, *args]
        with open(tmp_path / f'{name}_node{node}.log', 'w') as log:
            agents.append(subprocess.Popen(command, cwd=REPO, env=subprocess_env(tmp_path),
                                           stdout=log, stderr=subprocess.STDOUT))
    return agents


def wait_all(agents, timeout=240):
    try:
        for agent in agents:
            agent.wait(timeout=timeout)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()


def agent_logs(tmp_path, name):
    return '\n'.join((tmp_path / f'{name}_node{node}.log').read_text() for node in range(2))


@pytest.fixture(scope='module')
def two_node_run(tmp_path_factory):
    """An uninterrupted two-agent training run: (workspace, its arguments, its run folder)."""
    root = tmp_path_factory.mktemp('multinode')
    data, cfg = write_image_folder(root / 'data'), write_config(root / 'tiny.yaml')
    args = ['--cfg', cfg, '--data-path', data, '--opts', *TRAIN_OPTS]
    agents = start_two_nodes(root, args + ['--output', str(root / 'two_nodes')], 'straight')
    wait_all(agents)
    assert [agent.returncode for agent in agents] == [0, 0], agent_logs(root, 'straight')[-3000:]
    return root, args, run_dir(str(root / 'two_nodes'))


@pytest.mark.slow  # the killed-worker case trains the same two nodes; the slow run
def test_two_nodes_match_one_node_with_two_processes(two_node_run):
    root, args, two_nodes = two_node_run
    assert_ok(run_main(root, args + ['--output', str(root / 'one_node')], nproc=2))
    one_node = load_weights(os.path.join(run_dir(str(root / 'one_node')), LAST_CHECKPOINT))
    weights = load_weights(os.path.join(two_nodes, LAST_CHECKPOINT))
    assert weights.keys() == one_node.keys()
    for key in weights:  # the same sums, possibly added in another order
        torch.testing.assert_close(weights[key], one_node[key], rtol=1e-6, atol=1e-8, msg=key)

    # the two nodes' validation of their last weights is one process's evaluation of them
    evaluated = run_main(root, ['--cfg', args[1], '--data-path', args[3], '--eval', '--resume',
                                os.path.join(two_nodes, LAST_CHECKPOINT),
                                '--output', str(root / 'eval')])
    assert_ok(evaluated)
    with open(os.path.join(two_nodes, 'log_rank0.txt')) as f:
        validated = ACCURACY_LINE.findall(f.read())
    assert len(validated) == EPOCHS
    assert ACCURACY_LINE.findall(evaluated.stdout) == [validated[-1]]


def test_a_killed_worker_brings_both_nodes_back_bit_identical(two_node_run):
    root, args, two_nodes = two_node_run
    run = run_dir(str(root / 'elastic'))
    agents = start_two_nodes(root, args + ['--output', str(root / 'elastic')], 'elastic',
                             torchrun_args=['--max-restarts', '1'])
    try:
        wait_for(reached(run, 0, 2), agents[1])
        workers = children(agents[1].pid)
        assert len(workers) == 1 and b'RANK' in environ(workers[0])
        os.kill(workers[0], signal.SIGKILL)  # the second node's only worker, mid-epoch
    finally:
        wait_all(agents)
    logs = agent_logs(root, 'elastic')
    assert [agent.returncode for agent in agents] == [0, 0], logs[-3000:]
    assert 'auto resuming from' in open(os.path.join(run, 'log_rank0.txt')).read()
    assert_same_training_state(os.path.join(two_nodes, LAST_CHECKPOINT),
                               os.path.join(run, LAST_CHECKPOINT))
