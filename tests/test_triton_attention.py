"""The fused attention for CUDA (models/triton_attention.py) without a GPU: its Triton kernels run by
Triton's CPU interpreter against plain attention, compiled for sm_90 (registers, spills, shared memory),
and the switch that chooses it (set_cuda_attention).

Triton reads TRITON_INTERPRET when the kernels are defined, so the interpreter runs in a subprocess
(tests/triton_interpreter_cases.py) under a time limit; float32 and float16 only, as the interpreter's
bf16 products are wrong (triton#11584). The relative errors of every case are printed (-s) and recorded
as properties.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, subprocess_env
from models.triton_attention import MAX_HEAD_DIM, TRITON_AVAILABLE, fused_attention_unsupported
from models.window_attention import cuda_attention_kernel, set_cuda_attention

needs_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason='needs Triton')

# ‖fused − float64 reference‖ / ‖reference‖ from the same rounded inputs; measured at most 2.5e-7
# (float32) and 1.1e-3 (float16: the probabilities and dS enter their products rounded to float16).
BOUNDS = {'float32': 1e-5, 'float16': 3e-3}
# logits near -144 (base 2) are float32 multiples of 2^-16: 4.8e-6 measured
CASE_BOUNDS = {('negative-logits', 'float32'): 3e-5}
CASES = [('model-training-step', 'float32'), ('per-window-bias', 'float32'), ('negative-logits', 'float32'),
         ('negative-logits', 'float16'), ('shared-slots', 'float32'), ('shifted-odd-map', 'float32'),
         ('shared-slots', 'float16'), ('shifted-odd-map', 'float16'), ('focal-t-stage-0', 'float16'),
         ('detection-stage-0', 'float16'), ('window-12-stage-0', 'float16')]
# the model's parameter gradients pass through the rest of the network; some are tiny (2.5e-6 measured)
MODEL_BOUNDS = {'attention outputs': 1e-5, 'parameters': 1e-4}
# sm_90 allows 227 KiB of shared memory per block
SM90_SHARED_BYTES = 227 * 1024


@pytest.fixture(scope='module')
def interpreter_results(tmp_path_factory):
    """{(case, dtype) or case: its JSON line} from one interpreter run of every case."""
    env = dict(subprocess_env(tmp_path_factory.mktemp('interpreter')), TRITON_INTERPRET='1')
    result = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'triton_interpreter_cases.py')], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
    return {(line['case'], line['dtype']) if 'dtype' in line else line['case']: line for line in lines}


@needs_triton
@pytest.mark.parametrize('case, dtype', CASES, ids=[f'{case}-{dtype}' for case, dtype in CASES])
def test_fused_kernels_match_plain_attention_in_the_interpreter(interpreter_results, record_property, case, dtype):
    """Output and every gradient (q, k, v rows; bias) against float64 attention: slots that share rows
    within and across windows, per-window and shared bias, a per-query (shifted) mask, odd maps padded to
    the window, partial query and key blocks, several heads, logits far below zero, and the released,
    detection and 384 stage-0 layouts; masked slots reading a loud row change nothing and give it an
    exactly zero gradient; a tiny model's training step."""
    line = interpreter_results[case, dtype]
    for name, error in line['errors'].items():
        record_property(f'{case}-{dtype}-{name}', error)
    bounds = MODEL_BOUNDS if case == 'model-training-step' else dict.fromkeys(
        ('output', 'q', 'k', 'v', 'bias'), CASE_BOUNDS.get((case, dtype), BOUNDS[dtype]))
    assert set(line['errors']) == set(bounds)
    for name, bound in bounds.items():
        assert line['errors'][name] < bound, (name, line['errors'][name])
    assert line.get('finite', True)
    exact = {key: value for key, value in line.items() if isinstance(value, bool)}
    assert all(exact.values()), exact


@needs_triton
def test_one_gradient_alone_equals_the_gradient_computed_beside_the_other(interpreter_results):
    """Bias-only training (frozen projections, where SDPA's CUDA backward once read memory it did not
    own) and rows-only: the kernel's gradient flags skip work, not change it."""
    line = interpreter_results['shared-slots-one-gradient']
    assert line['bias_only_equal'] and line['rows_only_equal'], line


@needs_triton
def test_custom_op_passes_opcheck(interpreter_results):
    """torch.library.opcheck of the forward and backward ops: schema, autograd registration, fake outputs
    equal to the real ones in shape, stride and dtype (torch.compile plans with them), AOT autograd with
    dynamic shapes."""
    results = interpreter_results['opcheck']['results']
    assert set(results) >= {'test_schema', 'test_autograd_registration', 'test_faketensor',
                            'test_aot_dispatch_dynamic'}
    assert all(outcome == 'SUCCESS' for outcome in results.values()), results


@needs_triton
def test_largest_relative_error_of_each_gradient(interpreter_results):
    """The report: per dtype, the largest relative error of the output and each gradient over the cases."""
    largest = {}
    for (case, dtype), line in ((key, line) for key, line in interpreter_results.items() if isinstance(key, tuple)):
        if case != 'model-training-step':
            for name, error in line['errors'].items():
                largest[dtype, name] = max(largest.get((dtype, name), 0.), error)
    assert {dtype for dtype, _ in largest} == set(BOUNDS)
    print('\nlargest relative error over the interpreter cases: ' + ', '.join(
        f'{dtype} {name} {error:.1e}' for (dtype, name), error in sorted(largest.items())))


@needs_triton
def test_kernels_compile_for_sm_90_without_spills():
    """benchmarks/kernel_report.py: every config's attention shapes, and both kernels compiled by Triton
    for sm_90 at each tile configuration they take (bf16 and float32; float16 compiles as bf16 does),
    with ptxas's registers and spills. Type errors fail the compile; spills or more shared memory than a
    block has would make the kernels slow or unlaunchable."""
    result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'kernel_report.py'), '--dtypes',
                             'bfloat16', 'float32', '--json'], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout[:result.stdout.rindex('\n{')])
    report = json.loads(result.stdout.splitlines()[-1])
    configs = {layout['config'] for layout in report['layouts']}
    assert {'configs/focal_tiny_patch4_window7_224.yaml', 'configs/focal_base_patch4_window12_384_finetune.yaml',
            'configs/detection/mask_rcnn_focal_tiny_1x.yaml', 'configs/segmentation/upernet_focal_tiny_160k.yaml'
            } <= configs
    shapes = {tuple(shape) for layout in report['layouts'] for shape in layout['shapes']}
    # the released stage 0, the detection recipes' focal window 15, the 384 fine-tuning's window 12
    assert {(7, 49, 230, 32), (7, 49, 406, 32), (12, 144, 625, 32)} <= shapes
    compiled = {(row['kernel'], row['dtype'], tuple(shape)) for row in report['kernels'] for shape in row['shapes']}
    for window, queries, keys, head_dim in shapes:
        for dtype in ('bfloat16', 'float32'):
            assert fused_attention_unsupported(torch.empty(1, 1, 3 * head_dim, dtype=getattr(torch, dtype)),
                                               torch.empty(1, queries, keys), 0.) is None
            for kernel in ('_forward_kernel', '_backward_kernel'):
                assert (kernel, dtype, (window, queries, keys, head_dim)) in compiled
    for row in report['kernels']:
        assert row['spill_stores'] == row['spill_loads'] == 0, row
        assert row['registers'] <= 255 and row['shared'] <= SM90_SHARED_BYTES, row


@needs_triton
@pytest.mark.parametrize('mask', ['none', 'per-query'])
def test_kernels_compile_for_sm_90_with_the_other_masks(mask):
    """The bias and mask added before the call (a per-window bias) and a mask per query (shifted blocks),
    bf16 at the released stage 0: compiled, no spills."""
    spec = importlib.util.spec_from_file_location('kernel_report', os.path.join(REPO, 'benchmarks', 'kernel_report.py'))
    kernel_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_report)
    for name, kernel in kernel_report.compile_kernels(torch.bfloat16, 49, 230, 32, 90, mask).items():
        resources = kernel_report.ptxas_resources(kernel.asm['ptx'], 90)
        print(f'{name} {mask}: {resources}, shared {kernel.metadata.shared} B')
        assert resources['spill_stores'] == 0 and kernel.metadata.shared <= SM90_SHARED_BYTES, (name, resources)


def test_set_cuda_attention_chooses_the_cuda_path():
    """'sdpa' (the default until a GPU run measures the fused kernel faster), 'auto' (the fused kernel
    where it can run the case), 'fused' (it or a one-line error naming why not); a bad name is a
    ValueError naming it. CPU tensors stand in for CUDA ones: the choice reads dtype, shape and dropout."""
    bf16, float64 = torch.empty(1, 4, 3 * 64, dtype=torch.bfloat16), torch.empty(1, 4, 3 * 64, dtype=torch.float64)
    bias = torch.empty(2, 4, 5)
    try:
        assert cuda_attention_kernel(bf16, bias, 0.) == 'sdpa'
        set_cuda_attention('auto')
        assert cuda_attention_kernel(bf16, bias, 0.) == ('fused' if TRITON_AVAILABLE else 'sdpa')
        assert cuda_attention_kernel(bf16, bias, 0.1) == cuda_attention_kernel(float64, bias, 0.) == 'sdpa'
        too_wide = torch.empty(1, 4, 3 * 2 * (MAX_HEAD_DIM + 1), dtype=torch.bfloat16)
        assert cuda_attention_kernel(too_wide, bias, 0.) == 'sdpa'
        set_cuda_attention('fused')
        with pytest.raises(ValueError, match=r"set_cuda_attention\('fused'\): attention dropout \(0.1\)"):
            cuda_attention_kernel(bf16, bias, 0.1)
        with pytest.raises(ValueError, match='torch.float64'):
            cuda_attention_kernel(float64, bias, 0.)
        with pytest.raises(ValueError, match='head dim 65 is above 64'):
            cuda_attention_kernel(too_wide, bias, 0.)
        set_cuda_attention('sdpa')
        assert cuda_attention_kernel(bf16, bias, 0.) == 'sdpa'
    finally:
        set_cuda_attention()
    with pytest.raises(ValueError, match="'flash'"):
        set_cuda_attention('flash')


def test_triton_missing_leaves_sdpa_and_names_it(monkeypatch):
    """Without Triton 'auto' stays on SDPA and 'fused' says Triton is missing."""
    import models.triton_attention

    monkeypatch.setattr(models.triton_attention, 'TRITON_AVAILABLE', False)
    qkv, bias = torch.empty(1, 4, 3 * 8, dtype=torch.bfloat16), torch.empty(1, 4, 5)
    try:
        set_cuda_attention('auto')
        assert cuda_attention_kernel(qkv, bias, 0.) == 'sdpa'
        set_cuda_attention('fused')
        with pytest.raises(ValueError, match='Triton is not installed'):
            cuda_attention_kernel(qkv, bias, 0.)
    finally:
        set_cuda_attention()
