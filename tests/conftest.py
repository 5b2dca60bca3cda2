"""Fixtures shared by the model tests, and the session's clean-up of processes tests left behind."""
import os
import signal
import uuid

import pytest

from helpers import tagged_processes
from models.window_attention import set_cpu_attention

SESSION_TAG = 'FOCAL_TEST_SESSION'


def pytest_sessionstart(session):
    os.environ[SESSION_TAG] = uuid.uuid4().hex  # inherited by every process a test starts


def pytest_sessionfinish(session, exitstatus):
    """A process a test left running (an orphaned worker, a hung run) would hold the output of whatever
    ran pytest open after it ends: each is named and killed."""
    for entry in tagged_processes(SESSION_TAG, os.environ[SESSION_TAG]):
        pid = int(entry.split(':', 1)[0])
        if pid != os.getpid():
            print(f"\nconftest: killing a process a test left behind: {entry}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(params=['fused-kernel', 'materialised-logits', 'materialised-logits-small-chunks'])
def cpu_attention(request):
    """Runs a test on each CPU attention path (models.window_attention.set_cpu_attention): PyTorch's
    fused kernel in every dtype, the logits materialised a chunk of windows at a time (every dtype
    but float16, bf16 on any CPU), and the same with chunks of a few windows (1000 bytes of logits),
    so that an image takes several and the last is short."""
    if request.param == 'fused-kernel':
        set_cpu_attention('fused')
    elif request.param == 'materialised-logits':
        set_cpu_attention('materialised')
    else:
        set_cpu_attention('materialised', chunk_bytes=1000)
    yield request.param
    set_cpu_attention()
