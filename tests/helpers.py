"""Shared pieces of the main.py tests: a small image folder, a tiny focal config, and running
main.py as users do (python or torchrun) in a subprocess with a timeout."""
import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
import time
import zipfile

from unittest import mock

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, 'main.py')
CLASSES = ('circle', 'square', 'stripe')

# A real focal model (two levels, fc pooling, neighbour keys) small enough for a CPU test.
TINY_CONFIG = """\
MODEL:
  NAME: tiny_focal
  DROP_PATH_RATE: 0.1
  FOCAL:
    EMBED_DIM: 8
    DEPTHS: [1, 1]
    NUM_HEADS: [1, 2]
    WINDOW_SIZE: 4
    FOCAL_POOL: fc
    FOCAL_LEVELS: [2, 2]
    FOCAL_WINDOWS: [3, 1]
    EXPAND_SIZES: [2, 2]
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 4
  NUM_WORKERS: 0
  PIN_MEMORY: False
TRAIN:
  EPOCHS: 2
  WARMUP_EPOCHS: 1
  BASE_LR: 0.05
  WARMUP_LR: 0.0005
  MIN_LR: 0.0005
PRINT_FREQ: 4
"""
# The same network as TINY_CONFIG, for tests that build it directly (3 classes).
TINY_KWARGS = dict(img_size=32, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4,
                   focal_pool='fc', focal_levels=[2, 2], focal_windows=[3, 1], expand_sizes=[2, 2],
                   num_classes=3)
# A released variant's recipe (four stages, window 7, two fc-pooled levels) with narrow, one-block
# stages: for tests that build it through timm at the released image size.
TIMM_NAME = 'focal_tiny_patch4_window7_224'
TIMM_TINY_ARCH = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))


@contextlib.contextmanager
def uninitialised():
    """Models built inside hold their weights uninitialised (whatever torch.empty gives): for tests that
    count the parameters of full-size models or compare their shapes, which initialisation makes take
    seconds."""
    import models.focal_transformer
    leave = lambda tensor, *args, **kwargs: tensor  # noqa: E731
    with contextlib.ExitStack() as stack:
        for name in ('kaiming_uniform_', 'kaiming_normal_', 'xavier_uniform_', 'uniform_', 'normal_',
                     'trunc_normal_'):
            stack.enter_context(mock.patch.object(torch.nn.init, name, leave))
        stack.enter_context(mock.patch.object(models.focal_transformer, 'trunc_normal_', leave))
        yield


def write_image_folder(root, n_train=14, n_val=7, size=32, seed=0):
    """root/train and root/val with one folder per class of CLASSES; each class has its own
    colour and shape under noise, so a model can learn something. 3 x 7 = 21 val images: an odd
    number, which no two processes split evenly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = {'circle': (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2,
             'square': (abs(yy - size / 2) < size / 4) & (abs(xx - size / 2) < size / 4),
             'stripe': (xx // 5) % 2 == 0}
    colours = {'circle': (220, 40, 40), 'square': (40, 200, 40), 'stripe': (40, 40, 220)}
    for split, count in (('train', n_train), ('val', n_val)):
        for label in CLASSES:
            folder = os.path.join(root, split, label)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                image = rng.integers(0, 90, (size, size, 3))
                image[masks[label]] = np.array(colours[label]) + rng.integers(-30, 30, 3)
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(
                    os.path.join(folder, f'{i}.png'))
    return str(root)


def zip_dataset(folder, out):
    """`folder`'s train/ and val/ as the original's zip layout: {split}.zip holding the images
    and {split}_map.txt listing 'path<TAB>label', labels numbered as ImageFolder numbers them."""
    os.makedirs(out, exist_ok=True)
    for split in ('train', 'val'):
        split_dir = os.path.join(folder, split)
        entries = [(f'{label}/{name}', index)
                   for index, label in enumerate(sorted(os.listdir(split_dir)))
                   for name in sorted(os.listdir(os.path.join(split_dir, label)))]
        with zipfile.ZipFile(os.path.join(out, f'{split}.zip'), 'w') as archive:
            for member, _ in entries:
                archive.write(os.path.join(split_dir, member), member)
        with open(os.path.join(out, f'{split}_map.txt'), 'w') as f:
            f.writelines(f'{member}\t{index}\n' for member, index in entries)
    return str(out)


def write_config(path, extra=''):
    with open(path, 'w') as f:
        f.write(TINY_CONFIG + extra)
    return str(path)


def run_dir(output, tag='default'):
    return os.path.join(output, 'tiny_focal', tag)


def subprocess_env(tmp_path):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS='1', TORCH_HOME=str(tmp_path / 'torch_home'), PYTHONUNBUFFERED='1')
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(name, None)
    return env


def main_command(args, nproc=1, torchrun_args=()):
    if nproc == 1 and not torchrun_args:
        return [sys.executable, MAIN, *args]
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone',
            f'--nproc_per_node={nproc}', *torchrun_args, MAIN, *args]


def run_main(tmp_path, args, nproc=1, torchrun_args=(), timeout=180):
    """Run main.py to the end; returns the CompletedProcess (text stdout/stderr)."""
    return subprocess.run(main_command(args, nproc, torchrun_args), cwd=REPO,
                          env=subprocess_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


def run_main_together(tmp_path, argument_lists, timeout=180):
    """main.py once for each {name: arguments} of `argument_lists`, side by side (each run is mostly
    interpreter start-up); returns {name: CompletedProcess}."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(argument_lists)) as pool:
        results = pool.map(lambda args: run_main(tmp_path, args, timeout=timeout), argument_lists.values())
        return dict(zip(argument_lists, results))


def start_main(tmp_path, args, nproc=1, torchrun_args=(), log_path=None, new_session=False):
    """Start main.py in the background (output to `log_path`); the caller waits with a timeout.
    `new_session` puts it in its own process group, which the caller can kill as a whole."""
    with open(log_path or os.devnull, 'w') as log:
        return subprocess.Popen(main_command(args, nproc, torchrun_args), cwd=REPO,
                                env=subprocess_env(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=new_session)


def load_weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']


def assert_ok(result):
    assert result.returncode == 0, \
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def children(pid):
    """The child processes of `pid` (torchrun's workers)."""
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        return [int(child) for child in f.read().split()]


def environ(pid):
    with open(f'/proc/{pid}/environ', 'rb') as f:
        return dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)


def tagged_processes(name, value):
    """'pid: command' of every process whose environment has `name`=`value`."""
    found = []
    for pid in os.listdir('/proc'):
        if pid.isdigit():
            try:
                if environ(int(pid)).get(name.encode()) == value.encode():
                    with open(f'/proc/{pid}/cmdline', 'rb') as f:
                        command = f.read().replace(b'\0', b' ').decode()
                    found.append(f"{pid}: {command[:150]}")
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                pass
    return found


def wait_for(condition, process, timeout=120, poll=0.02):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the moment the test waits for"
        assert time.time() < deadline, "timed out waiting"
        time.sleep(poll)


def stop_when(process, condition, send, poll=0.02):
    """Wait for `condition`, call `send()` to stop the run and wait for it to exit; returns the
    seconds from `send()` to the exit. A run still alive when the test ends is killed, with its
    process group when it leads one."""
    try:
        wait_for(condition, process, poll=poll)
        start = time.time()
        send()
        process.wait(timeout=60)
        return time.time() - start
    finally:
        if process.poll() is None:
            if os.getpgid(process.pid) == process.pid:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()


def assert_same_training_state(path_a, path_b):
    """The two checkpoints hold the same training state, bit for bit."""
    a = torch.load(path_a, weights_only=True)
    b = torch.load(path_b, weights_only=True)
    for weights in ('model', 'model_ema'):
        assert (weights in a) == (weights in b), weights
        if weights in a:
            assert a[weights].keys() == b[weights].keys()
            for key in a[weights]:
                assert torch.equal(a[weights][key], b[weights][key]), f"{weights} {key} differs"
    for index, state in a['optimizer']['state'].items():
        for name, value in state.items():
            assert torch.equal(value, b['optimizer']['state'][index][name]), f"optimizer {index} {name}"
    for key in ('lr_scheduler', 'scaler', 'epoch', 'step', 'max_accuracy', 'bad_samples'):
        assert a.get(key) == b.get(key), key
