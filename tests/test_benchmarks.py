"""benchmarks/: ab.py (two checkouts' models side by side in one process), throughput.py, ceiling.py and
checkpoint_read.py."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# inference in the slow run only: the training case takes the same path through ab.py
@pytest.mark.parametrize('options, setting, dtype, compared, size', [
    pytest.param(['--rounds', '1'], 'infer', 'float32', 'logit', '64', marks=pytest.mark.slow),
    (['--rounds', '2', '--mode', 'train', '--bf16'], 'train, bf16 autocast', 'bfloat16', 'logit', '64'),
    (['--rounds', '2', '--mode', 'train', '--detector-size', '64', '96'], 'train', 'float32', 'last stage map',
     '64x96'),
], ids=['inference', 'bf16-training', 'detector-training'])
def test_ab_builds_each_checkouts_own_model_and_reports_a_ratio(tmp_path, options, setting, dtype, compared, size):
    """A copy of models/ whose attention scale is doubled must give different logits (under bf16
    autocast too), or stage maps as a detection backbone: each side is imported from its own checkout,
    not the first one imported under the name `models`."""
    other = tmp_path / 'other'
    shutil.copytree(REPO / 'models', other / 'models')
    source = other / 'models' / 'focal_transformer.py'
    text = source.read_text()
    assert 'self.scale = qk_scale or head_dim ** -0.5' in text
    source.write_text(text.replace('self.scale = qk_scale or head_dim ** -0.5',
                                   'self.scale = 2 * (qk_scale or head_dim ** -0.5)'))
    result = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'ab.py'), str(REPO), str(other),
                             '--batch-size', '1', '--img-size', '64', '--threads', '1', *options],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    difference = float(re.search(rf'largest {compared} difference between A and B \(torch.{dtype}\): (\S+)',
                                 result.stdout).group(1))
    assert difference > 1e-3
    assert re.search(rf'B speed-up over A \({setting}, batch 1, {size} px, 1 threads\): '
                     rf'median \d+\.\d{{3}}x, best \d+\.\d{{3}}x', result.stdout), result.stdout
    # the spread of the round-by-round ratios, from two rounds on
    spread = re.search(r'round by round, B speed-up over A: middle half (\d+\.\d{3})x-(\d+\.\d{3})x', result.stdout)
    assert (spread is not None) == (int(options[options.index('--rounds') + 1]) >= 2), result.stdout
    assert spread is None or 0 < float(spread.group(1)) <= float(spread.group(2))


@pytest.mark.slow  # a minute of benchmark runs: the slow run (pytest.ini)
def test_throughput_profile_prints_each_models_busiest_operators():
    """throughput.py end to end on a small input, with --profile: the table row, then the profiler's
    operator tables for training and inference, which must show the model's matrix products."""
    model = 'focal_tiny_patch4_window7_224'
    result = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'throughput.py'), '--models', model,
                             '--img-size', '64', '--batch-size', '2', '--steps', '1', '--repeats', '1',
                             '--warmup', '1', '--threads', '1', '--profile', '1'],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert re.search(rf'float32 eager\s+{model}\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+\s+\d+', result.stdout), result.stdout
    sections = re.split(rf'\n{model}, float32 eager, (training|inference): 1 steps\n', result.stdout)
    assert sections[1::2] == ['training', 'inference'], result.stdout
    for table in sections[2::2]:
        assert 'Self CPU time total' in table and 'aten::addmm' in table, table


@pytest.mark.slow  # a minute of benchmark runs: the slow run (pytest.ini)
def test_ceiling_bound_is_the_time_without_attention_plus_the_products():
    """ceiling.py end to end at batch 1: it reads every block's attention shape from the model (2, 2, 6
    and 2 blocks per stage at 224 px) and the distinct, unmasked keys of its windows (the 12 duplicate
    neighbour slots and, on average, the pooled cells outside the grid left out), and each bound adds
    the two measured parts it names."""
    result = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'ceiling.py'),
                             '--batch-size', '1', '--rounds', '1', '--threads', '1'],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    blocks = {(int(w), int(h), int(k)): (int(n), int(d), float(infer), float(train), float(d_infer), float(d_train))
              for w, h, k, n, infer, train, d, d_infer, d_train in re.findall(
                  r'(\d+) windows x +(\d+) heads, 49 queries, +(\d+) keys \(head dim 32, (\d+) blocks\): '
                  r'inference +(\S+) ms +\d+ GFLOP/s, training +(\S+) ms +\d+ GFLOP/s; '
                  r'+(\d+) distinct keys: +(\S+) / +(\S+) ms',
                  out)}
    assert {shape: (n, d) for shape, (n, d, *_) in blocks.items()} == {
        (64, 3, 230): (2, 199), (16, 6, 206): (2, 181), (4, 12, 190): (6, 173), (1, 24, 50): (2, 50)}, out
    rows = {name: (float(infer), float(train)) for name, infer, train in
            re.findall(r'^(\S.*?) {2,}(\d+\.\d) +(\d+\.\d)$', out, re.MULTILINE)}
    products, distinct = rows['Focal-T attention products alone'], rows['products over distinct keys only']
    for mode in (0, 1):
        assert abs(products[mode] - sum(n * t[mode] for n, _, *t in blocks.values())) < 0.2, out
        assert abs(distinct[mode] - sum(n * t[2 + mode] for n, _, *t in blocks.values())) < 0.2, out
        assert abs(rows['bound: without attention + products'][mode]
                   - rows['Focal-T without attention'][mode] - products[mode]) < 0.2, out
        assert abs(rows['bound: without attention + those'][mode]
                   - rows['Focal-T without attention'][mode] - distinct[mode]) < 0.2, out
        assert rows['Focal-T'][mode] > 0 and rows['Swin-T'][mode] > 0
    assert re.search(r'^train: Focal-T / Swin-T now \d+\.\d\dx, at most \d+\.\d\dx on this CPU, '
                     r'\d+\.\d\dx over distinct keys only$', out, re.MULTILINE)


@pytest.mark.slow  # a minute of benchmark runs: the slow run (pytest.ini)
def test_checkpoint_read_times_a_released_size_pdparams():
    """checkpoint_read.py end to end on Focal-T's layout: a line with its tensor count, the
    .pdparams size and the three times."""
    result = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'checkpoint_read.py'),
                             '--model', 'focal_tiny_patch4_window7_224', '--rounds', '1'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.fullmatch(r'focal_tiny_patch4_window7_224: 256 tensors, 1\d\d MiB \.pdparams; read \d+\.\d\d s, '
                        r'convert to safetensors \d+\.\d\d s, read the safetensors \d+\.\d\d s \(best of 1\)\n',
                        result.stdout), result.stdout


# (label, --methods name) of each detector throughput.py --detector times
THROUGHPUT_DETECTORS = [('Mask R-CNN', 'mask_rcnn'), ('Cascade Mask R-CNN', 'cascade_mask_rcnn'), ('ATSS', 'atss'),
                        ('Sparse R-CNN', 'sparse_rcnn'), ('RepPointsV2', 'reppoints_v2')]


@pytest.mark.slow  # benchmark runs of every detector on both backbones, about 3 minutes: the slow run (pytest.ini)
def test_throughput_detector_rows_measure_the_asked_focal_windows():
    """throughput.py --detector end to end on a small image: the backbone rows of both backbones, each
    detector of --methods on both and their ratios, the focal model built with the focal windows asked
    for (its parameter count shows it)."""
    import timm
    import models  # noqa: F401  (registers the focal models with timm)
    windows = (3, 3, 1, 1)
    result = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'throughput.py'), '--detector',
                             '--detector-size', '64', '96', '--focal-windows', *map(str, windows),
                             '--steps', '1', '--repeats', '1', '--warmup', '1', '--threads', '1',
                             '--methods', *(method for _, method in THROUGHPUT_DETECTORS)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    labels = ', '.join(label for label, _ in THROUGHPUT_DETECTORS)
    assert f'batch 1, 64x96 px, backbone inference, {labels} inference and training, focal windows 3 3 1 1' \
        in result.stdout
    focal = timm.create_model('focal_tiny_patch4_window7_224', focal_windows=windows)
    params = sum(p.numel() for p in focal.parameters())
    assert re.search(rf'\nfocal_tiny_patch4_window7_224\s+{params / 1e6:.2f}\s', result.stdout), result.stdout
    assert re.search(r'focal_tiny_patch4_window7_224 / swin_tiny_patch4_window7_224: inference \d+\.\d\dx, ',
                     result.stdout), result.stdout
    for label, _ in THROUGHPUT_DETECTORS:  # each detector's rows on both backbones, its ratios
        rows = rf'\n{label} +swin_tiny\S* +\d+\.\d\d .*\n{label} +focal_tiny\S* +\d+\.\d\d '
        assert re.search(rows, result.stdout), result.stdout
        assert re.search(rf'{label} inference \d+\.\d\dx, {label} training \d+\.\d\dx', result.stdout), result.stdout
    # one round: its ratio is the lowest, the median and the highest
    spread = re.search(r'round by round \(lowest/median/highest\): inference (\d+\.\d\d)/(\d+\.\d\d)/(\d+\.\d\d)x, '
                       r'Mask R-CNN inference ', result.stdout)
    assert spread is not None and len(set(spread.groups())) == 1, result.stdout


def test_alternating_rounds_time_every_model_in_turn_reversing_the_order_each_round(monkeypatch):
    """throughput.py --detector's timing: each round runs every model's steps, first to last, then last
    to first, so that a machine slowing down during the run does not fall on one model; each model gets
    one time per round."""
    sys.path.insert(0, str(REPO / 'benchmarks'))
    try:
        import throughput
    finally:
        sys.path.remove(str(REPO / 'benchmarks'))
    import torch
    calls = []
    clock = iter(range(1000))
    monkeypatch.setattr(throughput.time, 'perf_counter', lambda: next(clock))
    seconds = throughput.alternating_rounds([lambda: calls.append('a'), lambda: calls.append('b'),
                                             lambda: calls.append('c')], 2, 3, torch.device('cpu'))
    assert ''.join(calls) == 'aabbcc' + 'ccbbaa' + 'aabbcc'
    assert seconds == [[0.5] * 3] * 3  # two clock ticks a round of two steps


def test_cuda_check_plans_every_section_within_its_budget():
    """cuda_check.py, which a GPU session runs as is: --dry-run names the five sections in order with
    limits that fit the budget; a real run without a GPU stops with a one-line error, as do the
    per-kernel timings; --cuda-attention without --device cuda is a usage error."""
    import torch

    result = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'cuda_check.py'), '--dry-run', '--budget', '400'],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    plan = re.findall(r'=== (\w+): (.*) \(at most (\d+) s\)', result.stdout)
    assert [name for name, _, _ in plan] == ['versions', 'tests', 'kernels', 'throughput', 'compiled']
    assert sum(int(limit) for _, _, limit in plan) == 400
    assert 'tests/test_cuda.py' in plan[1][1] and '--cuda-attention sdpa fused --variants eager bf16' in plan[3][1]
    assert '--variants compile compile-bf16' in plan[4][1]
    if not torch.cuda.is_available():
        for script in ('cuda_check.py', 'attention_kernels.py'):
            result = subprocess.run([sys.executable, str(REPO / 'benchmarks' / script)],
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 1 and re.fullmatch(r'error: [^\n]*no CUDA device[^\n]*\n', result.stderr), \
                result.stderr
    result = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'throughput.py'), '--cuda-attention', 'fused'],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and '--cuda-attention chooses the CUDA attention; it needs --device cuda' in \
        result.stderr
