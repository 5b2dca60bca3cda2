"""Crash safety: SIGKILL and restart end bit-identical to an uninterrupted run; a rank that dies
under torchrun --max-restarts brings the group back; non-finite losses stop the run; auto-resume
skips unusable checkpoints; checkpoint writes are atomic; every accepted checkpoint layout loads."""
import argparse
import logging
import os
import signal

import pytest
import torch

import utils
from golden import GoldenCase
from helpers import (TINY_KWARGS, assert_ok, assert_same_training_state, children, environ,
                     load_weights, run_dir, run_main, start_main, stop_when, wait_for, write_config,
                     write_image_folder)
from models import backbone
from models.checkpoint import CheckpointError, atomic_write, read_checkpoint, resolve
from models.focal_transformer import FocalTransformer, checkpoint_filter_fn


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp('resume')
    return root, write_image_folder(root / 'data'), write_config(root / 'tiny.yaml')


def reached(run, epoch, step):
    """Whether the run in `run` has written a checkpoint at or after `step` of `epoch` (older
    step checkpoints are pruned as it goes, so look for any)."""
    def condition():
        names = os.listdir(run) if os.path.isdir(run) else []
        positions = [parsed.position() for parsed in map(utils.parse_checkpoint_name, names)
                     if parsed]
        return any(position >= (epoch, step) for position in positions)
    return condition


def test_sigkill_and_restart_end_bit_identical(workspace):
    """Default augmentation (RandAugment, Mixup/CutMix, random erasing, drop path), 2 loader
    workers, a checkpoint every 3 steps; the killed run is restarted with the same command."""
    root, data, cfg = workspace
    # 4 epochs leave the test plenty of time to kill the run in epoch 1
    args = ['--cfg', cfg, '--data-path', data, '--opts', 'DATA.NUM_WORKERS', '2',
            'TRAIN.SAVE_EVERY_STEPS', '3', 'TRAIN.EPOCHS', '4']
    assert_ok(run_main(root, args + ['--output', str(root / 'straight')]))

    killed = run_dir(str(root / 'killed'))
    process = start_main(root, args + ['--output', str(root / 'killed')],
                         log_path=root / 'killed.log', new_session=True)
    # the process and its loader workers, as a dead node
    stop_when(process, reached(killed, 1, 3), lambda: os.killpg(process.pid, signal.SIGKILL))
    assert process.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(killed, 'ckpt_epoch_3.pth'))

    restarted = run_main(root, args + ['--output', str(root / 'killed')])
    assert_ok(restarted)
    assert 'auto resuming from' in restarted.stdout and 'continuing at epoch' in restarted.stdout
    assert_same_training_state(os.path.join(run_dir(str(root / 'straight')), 'ckpt_epoch_3.pth'),
                               os.path.join(killed, 'ckpt_epoch_3.pth'))


@pytest.mark.slow  # test_multinode restarts a killed worker the same way; the slow run
def test_torchrun_brings_the_group_back_after_a_rank_dies(workspace):
    # Two 2-process runs (~35 s): the only way to show an elastic restart is to do one.
    root, data, cfg = workspace
    args = ['--cfg', cfg, '--data-path', data, '--opts', 'TRAIN.SAVE_EVERY_STEPS', '2',
            'TRAIN.EPOCHS', '4']
    assert_ok(run_main(root, args + ['--output', str(root / 'elastic_straight')], nproc=2))

    run = run_dir(str(root / 'elastic'))
    log = root / 'elastic.log'
    process = start_main(root, args + ['--output', str(root / 'elastic')], nproc=2,
                         torchrun_args=['--max-restarts', '1'], log_path=log)
    try:
        wait_for(reached(run, 0, 2), process)
        workers = [pid for pid in children(process.pid) if environ(pid).get(b'RANK') == b'1']
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert process.returncode == 0, output[-3000:]
    assert 'auto resuming from' in output
    assert_same_training_state(os.path.join(run_dir(str(root / 'elastic_straight')), 'ckpt_epoch_3.pth'),
                               os.path.join(run, 'ckpt_epoch_3.pth'))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(workspace):
    root, data, cfg = workspace
    out = str(root / 'nan')
    # A learning rate of 1e34 per 512 images sends the weights to ~1e32 in one step: the next
    # forward pass overflows.
    result = run_main(root, ['--cfg', cfg, '--data-path', data, '--output', out, '--opts',
                             'TRAIN.BASE_LR', '1e34', 'TRAIN.WARMUP_EPOCHS', '0',
                             'TRAIN.CLIP_GRAD', '0.0', 'TRAIN.SAVE_EVERY_STEPS', '1'])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: non-finite loss'), result.stderr
    assert 'at epoch 0 step ' in lines[0]
    step = int(lines[0].split('at epoch 0 step ')[1].split()[0])
    kept = os.path.join(run_dir(out), f'ckpt_epoch_0_step_{step}.pth')
    assert os.path.isfile(kept)
    assert not os.path.exists(os.path.join(run_dir(out), f'ckpt_epoch_0_step_{step + 1}.pth'))
    assert all(torch.isfinite(value).all() for value in load_weights(kept).values())


# ---------------------------------------------------------------------------------------------
# utils.py in-process
# ---------------------------------------------------------------------------------------------
class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def logger():
    log = logging.getLogger('test_resume')
    log.setLevel(logging.DEBUG)
    recorder = Recorder()
    log.addHandler(recorder)
    log.lines = recorder.lines
    yield log
    log.removeHandler(recorder)


def tiny_training_state(tmp_path):
    model = FocalTransformer(**TINY_KWARGS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'lr_scheduler': {},
            'scaler': {}, 'epoch': 0, 'step': None, 'max_accuracy': 0.0, 'config': ''}


def test_auto_resume_picks_the_newest_complete_checkpoint(tmp_path, logger):
    state = tiny_training_state(tmp_path)
    torch.save(state, tmp_path / 'ckpt_epoch_0.pth')
    torch.save(dict(state, epoch=1, step=4), tmp_path / 'ckpt_epoch_1_step_4.pth')
    torch.save(dict(state, epoch=1), tmp_path / 'ckpt_epoch_1.pth')
    full = (tmp_path / 'ckpt_epoch_1.pth').read_bytes()
    (tmp_path / 'ckpt_epoch_1.pth').write_bytes(full[:len(full) // 2])  # truncated
    torch.save({'model': state['model']}, tmp_path / 'ckpt_epoch_2.pth')  # weights only
    (tmp_path / 'ckpt_epoch_3.pth').write_text('not a checkpoint')
    (tmp_path / '.ckpt_epoch_4.pth.123.tmp').write_bytes(full[:100])  # a killed write
    torch.save(state, tmp_path / 'ckpt_best.pth')

    assert utils.auto_resume_helper(str(tmp_path), logger) == str(tmp_path / 'ckpt_epoch_1_step_4.pth')
    skipped = [line for line in logger.lines if line.startswith('auto-resume skips')]
    assert [line.split()[2].rstrip(':') for line in skipped] == \
        ['ckpt_epoch_3.pth', 'ckpt_epoch_2.pth', 'ckpt_epoch_1.pth']
    assert 'is not a checkpoint' in skipped[0]
    assert 'incomplete: no optimizer, lr_scheduler, epoch, max_accuracy' in skipped[1]
    assert 'not a readable PyTorch checkpoint' in skipped[2]
    assert utils.auto_resume_helper(str(tmp_path / 'absent')) is None


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt_epoch_0.pth')
    atomic_write(path, lambda f: torch.save({'model': {'w': torch.ones(3)}}, f))
    before = open(path, 'rb').read()

    def dies_half_way(f):
        f.write(before[:10])
        raise OSError('No space left on device')

    with pytest.raises(OSError):
        atomic_write(path, dies_half_way)
    assert open(path, 'rb').read() == before
    assert os.listdir(tmp_path) == ['ckpt_epoch_0.pth']


@pytest.mark.parametrize('keep, kept_epochs, kept_steps', [
    (2, [9, 10], ['ckpt_epoch_11_step_4.pth', 'ckpt_epoch_11_step_6.pth']),
    (0, [0, 1, 2, 9, 10], ['ckpt_epoch_11_step_2.pth', 'ckpt_epoch_11_step_4.pth', 'ckpt_epoch_11_step_6.pth']),
])
def test_prune_keeps_the_newest_and_the_best(tmp_path, logger, keep, kept_epochs, kept_steps):
    """Epochs 9 and 10 are newer than 2 (numbers, not names, order them); step checkpoints of
    epoch 10 are older than its epoch checkpoint and go whatever `keep` says (0: keep all)."""
    names = ['ckpt_epoch_0.pth', 'ckpt_epoch_1.pth', 'ckpt_epoch_2.pth', 'ckpt_epoch_9.pth',
             'ckpt_epoch_10.pth', 'ckpt_epoch_10_step_5.pth', 'ckpt_epoch_11_step_2.pth',
             'ckpt_epoch_11_step_4.pth', 'ckpt_epoch_11_step_6.pth', 'ckpt_best.pth',
             '.ckpt_epoch_11.pth.99.tmp', 'config.yaml']
    for name in names:
        (tmp_path / name).write_bytes(b'x')
    utils.prune_checkpoints(str(tmp_path), keep, logger)
    expected = ['ckpt_best.pth', 'config.yaml'] + [f'ckpt_epoch_{epoch}.pth' for epoch in kept_epochs] + kept_steps
    assert sorted(os.listdir(tmp_path)) == sorted(expected)


def test_released_wrapped_and_url_checkpoints_load(tmp_path, monkeypatch):
    golden = GoldenCase('micro_fc_224')
    model = FocalTransformer(**golden.kwargs)
    released = golden.reference_checkpoint()  # as distributed, with the reference's index buffers
    raw = tmp_path / 'released.pth'
    torch.save(released, raw)
    wrapped = tmp_path / 'wrapped.pth'
    torch.save({'model': released}, wrapped)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    for location in (str(raw), str(wrapped), raw.as_uri()):
        model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
        backbone.load_weights(model, read_checkpoint(location), location, adapt=False)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(golden.input()).double(), golden.output, rtol=1e-4, atol=1e-4)
    assert resolve(raw.as_uri()) == str(raw)  # a file:// URL is read in place, never copied
    assert not (tmp_path / 'hub').exists()


def test_another_architecture_names_the_keys(tmp_path):
    golden = GoldenCase('micro_fc_224')
    path = str(tmp_path / 'released.pth')
    torch.save(golden.reference_checkpoint(), path)
    with pytest.raises(CheckpointError) as error:
        backbone.load_weights(FocalTransformer(**TINY_KWARGS), read_checkpoint(path), path, adapt=False)
    message = str(error.value)
    assert path in message and '\n' not in message
    assert 'missing keys' in message or 'unexpected keys' in message
    assert 'wrong shape (checkpoint vs model): patch_embed.proj.weight (16, 3, 4, 4) vs (8, 3, 4, 4)' in message


def test_the_original_repositorys_training_checkpoint_loads(tmp_path):
    """The original's checkpoints pickle a yacs CfgNode beside the weights (and an apex state)."""
    from yacs.config import CfgNode
    model = FocalTransformer(**TINY_KWARGS)
    path = str(tmp_path / 'ckpt_epoch_299.pth')
    torch.save({'model': model.state_dict(), 'config': CfgNode({'TAG': 'default'}), 'epoch': 299,
                'max_accuracy': 82.2, 'amp': {}}, path)
    fresh = FocalTransformer(**TINY_KWARGS)
    checkpoint = read_checkpoint(path)
    backbone.load_weights(fresh, checkpoint, path, adapt=False)
    assert checkpoint['epoch'] == 299
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize('prefix', ['', 'module.', '_orig_mod.', '_orig_mod.module.'])
def test_resume_pretrained_and_timm_filter_unwrap_a_checkpoint_alike(tmp_path, logger, prefix):
    """A DDP (`module.`) or compiled (`_orig_mod.`) model's weights, raw or under 'model', load
    through --resume, --pretrained and timm's filter alike (models.checkpoint does it once for all)."""
    trained = FocalTransformer(**TINY_KWARGS).state_dict()
    trained = {key: torch.randn_like(value) if value.is_floating_point() else value
               for key, value in trained.items()}
    wrapped = {prefix + key: value for key, value in trained.items()}
    for layout, contents in (('raw', wrapped), ('model', {'model': wrapped, 'epoch': 3})):
        path = str(tmp_path / f'{layout}.pth')
        torch.save(contents, path)
        resumed, pretrained = FocalTransformer(**TINY_KWARGS), FocalTransformer(**TINY_KWARGS)
        backbone.load_weights(resumed, read_checkpoint(path), path, adapt=False)
        model_settings = argparse.Namespace(PRETRAINED=path, CLASS_NAMES=[], PRETRAINED_CLASS_ORDER='')
        config = argparse.Namespace(MODEL=model_settings)
        utils.load_pretrained(config, pretrained, logger)
        filtered = checkpoint_filter_fn(torch.load(path, weights_only=True), FocalTransformer(**TINY_KWARGS))
        for key, value in trained.items():
            assert torch.equal(resumed.state_dict()[key], value), (layout, key)
            assert torch.equal(pretrained.state_dict()[key], value), (layout, key)
            assert torch.equal(filtered[key], value), (layout, key)


def test_a_checkpoint_without_a_state_dict_is_named(tmp_path):
    path = str(tmp_path / 'notes.pth')
    torch.save({'model': {'weight': torch.ones(1), 'note': 'trained on Tuesday'}}, path)
    with pytest.raises(CheckpointError, match=f'{path} is not a model checkpoint .*entry note is a str'):
        backbone.load_weights(FocalTransformer(**TINY_KWARGS), read_checkpoint(path), path, adapt=False)
