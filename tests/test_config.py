"""Configuration: defaults, BASE inheritance, --opts and flags, the six released configs, and
a one-line ConfigError for every kind of bad input; and the run logger set up from it."""
import argparse
import json
import os
import re
from pathlib import Path

import pytest

import models.build
from config import ConfigError, get_config
from golden import LAYOUTS

ROOT = Path(__file__).resolve().parents[1]
# The original training configs (and the paper) use these; checkpoint_layouts.json lists the
# evaluation kwargs the reference data was made with, 0.2 for every model.
ORIGINAL_DROP_PATH = {'tiny': 0.2, 'small': 0.3, 'base': 0.5}


def load(cfg=None, *opts, **args):
    return get_config(argparse.Namespace(cfg=cfg, opts=list(opts), **args))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults():
    config = get_config(argparse.Namespace())
    assert config.is_frozen()
    assert config.MODEL.NUM_CLASSES == 0 and config.MODEL.FOCAL.FOCAL_POOL == 'none'
    assert config.MODEL.FOCAL.FOCAL_LEVELS == [1, 1, 1, 1] and config.MODEL.FOCAL.QK_SCALE is None
    assert config.TRAIN.BASE_LR == 5e-4 and config.TRAIN.OPTIMIZER.BETAS == (0.9, 0.999)
    assert config.TRAIN.AUTO_RESUME and config.TRAIN.KEEP_CHECKPOINTS == 3
    assert config.TRAIN.EMA.DECAY == 0.9998 and not config.TRAIN.EMA.ENABLE
    assert (config.AMP_ENABLE, config.AMP_DTYPE) == (False, 'bf16')
    assert config.AUG.HFLIP == 0.5
    assert config.OUTPUT == os.path.join('output', 'focal_tiny_patch4_window7_224', 'default')


def test_every_key_is_documented_where_it_is_set():
    lines = (ROOT / 'config.py').read_text().splitlines()
    undocumented = [line for previous, line in zip(lines, lines[1:])
                    if re.match(r'_C\.[A-Z_.]+ = ', line) and 'CN()' not in line
                    and not previous.startswith('#')]
    assert undocumented == []


def test_base_inheritance_relative_to_the_including_file(tmp_path):
    write(tmp_path / 'common' / 'grand.yaml', 'TRAIN:\n  EPOCHS: 7\n  WEIGHT_DECAY: 0.1\n')
    write(tmp_path / 'common' / 'parent.yaml',
          "BASE: ['grand.yaml']\nTRAIN:\n  EPOCHS: 9\nDATA:\n  IMG_SIZE: 64\n")
    child = write(tmp_path / 'exp' / 'child.yaml',
                  "BASE: ['../common/parent.yaml']\nDATA:\n  IMG_SIZE: 96\n")
    config = load(str(child))
    assert config.TRAIN.WEIGHT_DECAY == 0.1  # from the grandparent
    assert config.TRAIN.EPOCHS == 9  # parent over grandparent
    assert config.DATA.IMG_SIZE == 96  # child over parent


def test_opts_and_flags_override_the_file_in_order(tmp_path):
    cfg = write(tmp_path / 'a.yaml', 'DATA:\n  BATCH_SIZE: 16\nTRAIN:\n  BASE_LR: 1e-3\n')
    config = load(str(cfg), 'DATA.BATCH_SIZE', '32', 'TRAIN.MIN_LR', '1', 'MODEL.FOCAL.DEPTHS', '[1, 1, 2, 1]',
                  'TRAIN.OPTIMIZER.BETAS', '[0.8, 0.9]', 'MODEL.FOCAL.USE_SHIFT', 'true', 'TAG', '123',
                  batch_size=8, data_path='/data', zip=True, cache_mode='full', resume='r.pth',
                  pretrained='p.pth', accumulation_steps=4, use_checkpoint=True, output='/out',
                  tag='run', eval=True, throughput=True)
    assert config.TRAIN.BASE_LR == 1e-3 and config.TRAIN.MIN_LR == 1.0
    assert config.DATA.BATCH_SIZE == 8  # the flag wins over --opts
    assert config.MODEL.FOCAL.DEPTHS == [1, 1, 2, 1] and config.TRAIN.OPTIMIZER.BETAS == (0.8, 0.9)
    assert config.MODEL.FOCAL.USE_SHIFT is True
    assert (config.DATA.DATA_PATH, config.DATA.ZIP_MODE, config.DATA.CACHE_MODE) == ('/data', True, 'full')
    assert (config.MODEL.RESUME, config.MODEL.PRETRAINED) == ('r.pth', 'p.pth')
    assert config.TRAIN.ACCUMULATION_STEPS == 4 and config.TRAIN.USE_CHECKPOINT
    assert config.EVAL_MODE and config.THROUGHPUT_MODE
    assert config.OUTPUT == os.path.join('/out', config.MODEL.NAME, 'run')
    assert load(None, 'TAG', '123').TAG == '123'  # a string key keeps the string


@pytest.mark.parametrize('args, enabled, dtype', [
    ({'amp': True}, True, 'bf16'),
    ({'amp': True, 'opts': ['AMP_DTYPE', 'fp16']}, True, 'fp16'),
    ({'amp_opt_level': 'O1'}, True, 'bf16'),
    ({'amp_opt_level': 'O2'}, True, 'bf16'),
    ({'amp': True, 'amp_opt_level': 'O0'}, False, 'bf16'),
    ({'opts': ['AMP_OPT_LEVEL', 'O0', 'AMP_ENABLE', 'True']}, False, 'bf16'),
    ({}, False, 'bf16'),
])
def test_amp_flags(args, enabled, dtype):
    config = get_config(argparse.Namespace(**args))
    assert (config.AMP_ENABLE, config.AMP_DTYPE) == (enabled, dtype)


@pytest.mark.parametrize('key', ['TRAIN.START_EPOCH', 'LOCAL_RANK'])
def test_keys_nothing_reads_are_not_in_the_config(key):
    # The resume point comes from the checkpoint and the device from the LOCAL_RANK environment
    # variable; keys for them would be settings that do nothing.
    with pytest.raises(ConfigError, match=key):
        load(None, key, '1')


@pytest.mark.parametrize('cfg', ['focal_small_useconv_patch4_window7_224.yaml',
                                 'detection/retinanet_focal_tiny_3x.yaml',
                                 'detection/cascade_mask_rcnn_focal_micro_digits.yaml'])
def test_dumped_config_loads_back(tmp_path, cfg):
    """A run's config.yaml (every key, other detectors' settings at their defaults) loads as it was."""
    config = load(str(ROOT / 'configs' / cfg), 'SEED', '5')
    again = load(str(write(tmp_path / 'dumped.yaml', config.dump())))
    for key in config:
        if key != 'OUTPUT':  # OUTPUT gains MODEL.NAME/TAG at every load, as in the original
            assert again[key] == config[key], key


@pytest.mark.parametrize('name', json.loads(LAYOUTS.read_text()))
def test_released_configs_build_the_reference_kwargs(name, monkeypatch):
    # record what build_model passes to the network instead of building 30-90M parameters
    monkeypatch.setattr(models.build, 'FocalTransformer', lambda **kwargs: kwargs)
    config = load(str(ROOT / 'configs' / f'{name}.yaml'))
    built = models.build.build_model(config)
    expected = dict(json.loads(LAYOUTS.read_text())[name]['kwargs'])
    expected['drop_path_rate'] = ORIGINAL_DROP_PATH[name.split('_')[1]]
    assert {key: built[key] for key in expected} == expected
    assert config.MODEL.NAME == name
    # everything the reference kwargs leave out stays at the reference model's defaults
    defaults = dict(patch_size=4, in_chans=3, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0,
                    ape=False, patch_norm=True, use_checkpoint=False, use_shift=False,
                    expand_layer='all', use_layerscale=False,
                    use_pre_norm=False)
    assert {key: built[key] for key in defaults} == defaults


def one_line_error(*args, **kwargs):
    with pytest.raises(ConfigError) as error:
        load(*args, **kwargs)
    message = str(error.value)
    assert '\n' not in message
    return message


def test_missing_config_file(tmp_path):
    assert str(tmp_path / 'nope.yaml') in one_line_error(str(tmp_path / 'nope.yaml'))
    base_missing = write(tmp_path / 'a.yaml', "BASE: ['gone.yaml']\n")
    assert 'gone.yaml' in one_line_error(str(base_missing))


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = write(tmp_path / 'bad.yaml', 'TRAIN:\n  EPOCHS: 3\n  BASE_LR: [1, 2\n')
    message = one_line_error(str(bad))
    assert str(bad) in message and 'line' in message
    assert 'mapping' in one_line_error(str(write(tmp_path / 'list.yaml', '- 1\n- 2\n')))


def test_base_cycle(tmp_path):
    write(tmp_path / 'a.yaml', "BASE: ['b.yaml']\n")
    write(tmp_path / 'b.yaml', "BASE: ['a.yaml']\n")
    assert 'includes itself' in one_line_error(str(tmp_path / 'a.yaml'))


def test_unknown_keys_are_named(tmp_path):
    cfg = write(tmp_path / 'typo.yaml', 'TRAIN:\n  EPOCH: 3\n')
    message = one_line_error(str(cfg))
    assert "'TRAIN.EPOCH'" in message and str(cfg) in message
    assert "'MODEL.FOCAL.WINDOW'" in one_line_error(None, 'MODEL.FOCAL.WINDOW', '7')
    assert "'NOPE.KEY'" in one_line_error(None, 'NOPE.KEY', '1')
    assert "'TRAIN'" in one_line_error(None, 'TRAIN', '1')


def test_a_detection_key_the_chosen_detector_does_not_read_is_named(tmp_path):
    cfg = write(tmp_path / 'retina.yaml', 'TASK: detection\nMODEL:\n  DETECTION:\n    DETECTOR: retinanet\n'
                                          '    ROI_SAMPLES: 256\n')
    message = one_line_error(str(cfg))
    assert "'MODEL.DETECTION.ROI_SAMPLES'" in message and str(cfg) in message and "'retinanet'" in message
    assert "'MODEL.DETECTION.PROPOSALS'" in one_line_error(None, 'MODEL.DETECTION.DETECTOR', 'retinanet',
                                                           'MODEL.DETECTION.PROPOSALS', '[10, 5]')
    # what the detector reads is accepted, from the file and from --opts
    load(str(cfg), 'MODEL.DETECTION.DETECTOR', 'mask_rcnn')
    load(None, 'MODEL.DETECTION.DETECTOR', 'retinanet', 'MODEL.DETECTION.FPN_CHANNELS', '64')


def test_the_originals_legacy_keys_are_accepted_checked_and_not_kept(tmp_path):
    cfg = write(tmp_path / 'original.yaml', 'MODEL:\n  TYPE: focal\n  FOCAL:\n    EXPAND_STAGES: [0, 1]\n'
                                             'AMP_OPT_LEVEL: O1\n')
    config = load(str(cfg))
    assert config.AMP_ENABLE and 'TYPE' not in config.MODEL and 'EXPAND_STAGES' not in config.MODEL.FOCAL
    assert 'AMP_OPT_LEVEL' not in config and 'AMP_OPT_LEVEL' not in config.dump()
    message = one_line_error(str(cfg), 'MODEL.TYPE', 'swin')
    assert "'MODEL.TYPE'" in message and "'swin'" in message and '--opts' in message
    assert "'AMP_OPT_LEVEL'" in one_line_error(None, 'AMP_OPT_LEVEL', 'O3')


def test_odd_opts():
    assert 'odd number' in one_line_error(None, 'TRAIN.EPOCHS', '3', 'SEED')


@pytest.mark.parametrize('opts, key', [
    (['TRAIN.EPOCHS', 'many'], 'TRAIN.EPOCHS'),
    (['TRAIN.EPOCHS', '2.5'], 'TRAIN.EPOCHS'),
    (['TRAIN.BASE_LR', 'fast'], 'TRAIN.BASE_LR'),
    (['MODEL.FOCAL.DEPTHS', '[2, "x"]'], 'MODEL.FOCAL.DEPTHS'),
    (['MODEL.FOCAL.DEPTHS', '2'], 'MODEL.FOCAL.DEPTHS'),
    (['TRAIN.AUTO_RESUME', '1'], 'TRAIN.AUTO_RESUME'),
    (['DATA.CACHE_MODE', 'some'], 'DATA.CACHE_MODE'),
    (['TRAIN.OPTIMIZER.NAME', 'lamb'], 'TRAIN.OPTIMIZER.NAME'),
    (['AMP_DTYPE', 'fp8'], 'AMP_DTYPE'),
    (['DATA.BATCH_SIZE', '-4'], 'DATA.BATCH_SIZE'),
    (['TRAIN.ACCUMULATION_STEPS', '-1'], 'TRAIN.ACCUMULATION_STEPS'),
])
def test_bad_values_are_named(opts, key):
    message = one_line_error(None, *opts)
    assert f"'{key}'" in message and opts[1].strip('[]"').split(',')[0] in message


def test_wrong_type_in_yaml_names_file_key_and_value(tmp_path):
    cfg = write(tmp_path / 'types.yaml', 'DATA:\n  IMG_SIZE: big\n')
    message = one_line_error(str(cfg))
    assert "'DATA.IMG_SIZE'" in message and 'big' in message and str(cfg) in message
    empty = write(tmp_path / 'empty_value.yaml', 'TRAIN:\n  EPOCHS:\n')
    assert "'TRAIN.EPOCHS'" in one_line_error(str(empty))


@pytest.mark.parametrize('batch_size', [0, -2])
def test_zero_or_negative_batch_size_flag(batch_size):
    message = one_line_error(None, batch_size=batch_size)
    assert "'DATA.BATCH_SIZE'" in message and str(batch_size) in message


def test_flag_of_the_wrong_type_names_flag_and_key():
    message = one_line_error(None, accumulation_steps='two')
    assert "'TRAIN.ACCUMULATION_STEPS'" in message and '--accumulation-steps' in message


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)  # main.py catches it; callers may catch ValueError


def test_logger_console_on_rank_0_file_per_rank_no_duplicate_handlers(tmp_path, capsys):
    from logger import create_logger
    create_logger(str(tmp_path / 'first'), dist_rank=0, name='focal_test')
    logger = create_logger(str(tmp_path), dist_rank=0, name='focal_test')
    assert len(logger.handlers) == 2
    logger.info('visible everywhere')
    logger.debug('file only')
    console = capsys.readouterr().out
    assert console.count('visible everywhere') == 1 and 'file only' not in console
    log_text = (tmp_path / 'log_rank0.txt').read_text()
    assert 'visible everywhere' in log_text and 'file only' in log_text
    assert not (tmp_path / 'first' / 'log_rank0.txt').exists()  # replaced before it wrote a line

    worker = create_logger(str(tmp_path), dist_rank=1, name='focal_test_rank1')
    worker.info('from rank 1')
    assert 'from rank 1' not in capsys.readouterr().out
    assert 'from rank 1' in (tmp_path / 'log_rank1.txt').read_text()


def test_a_held_log_file_is_written_only_once_released(tmp_path, capsys):
    """main.py holds the log file's lines until the weights fit: released, they are written in
    order before later ones; never released (the run stopped), nothing is written, not even at exit."""
    from logger import create_logger, release_log_file
    logger = create_logger(str(tmp_path / 'released'), dist_rank=0, name='focal_held', hold_file=True)
    logger.info('before')
    logger.debug('details before')
    assert 'before' in capsys.readouterr().out  # the console is not held
    assert os.listdir(tmp_path / 'released') == []
    release_log_file(logger)
    logger.info('after')
    lines = (tmp_path / 'released' / 'log_rank0.txt').read_text().splitlines()
    assert [line.rsplit(' ', 1)[-1] for line in lines] == ['before', 'before', 'after']
    assert len(logger.handlers) == 2

    stopped = create_logger(str(tmp_path / 'stopped'), dist_rank=0, name='focal_held_stopped',
                            hold_file=True)
    stopped.info('a checkpoint that does not fit')
    for handler in stopped.handlers:  # what logging.shutdown does at exit
        handler.flush()
    assert os.listdir(tmp_path / 'stopped') == []
