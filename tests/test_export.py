"""Export with a dynamic batch, height and width: `torch.onnx.export(..., dynamo=True)` (through
`torch.export`) from a model in eval mode whose parameters still require grad, as after training.
The ONNX file runs in onnxruntime at sizes other than the example's and matches eager PyTorch; so does
`torch.export` of each registered architecture from a 224 px example."""
import onnx
import onnxruntime
import pytest
import timm
import torch
from torch.export import Dim

import models  # noqa: F401  (registers the focal models with timm)
from helpers import TIMM_NAME, TIMM_TINY_ARCH

EXAMPLE_SHAPE = (2, 3, 224, 224)
OTHER_SHAPES = [(1, 3, 160, 288), (3, 3, 256, 192)]


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """(eager model, ONNX program, path of the .onnx file)."""
    torch.manual_seed(0)
    model = timm.create_model(TIMM_NAME, num_classes=5, **TIMM_TINY_ARCH).eval()
    example = torch.randn(EXAMPLE_SHAPE)
    dynamic = {'x': {0: Dim('batch', min=1, max=64), 2: Dim('height', min=64, max=2048),
                     3: Dim('width', min=64, max=2048)}}
    path = tmp_path_factory.mktemp('onnx') / 'focal.onnx'
    program = torch.onnx.export(model, (example,), path, dynamo=True, dynamic_shapes=dynamic,
                                input_names=['images'], output_names=['logits'])
    return model, program, path


def test_model_still_requires_grad(exported):
    model, _, _ = exported
    assert not model.training and all(param.requires_grad for param in model.parameters())


def test_onnx_input_is_dynamic(exported):
    _, _, path = exported
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert [bool(dim.dim_param) for dim in dims] == [True, False, True, True]


@pytest.mark.parametrize('shape', OTHER_SHAPES, ids=lambda shape: 'x'.join(map(str, shape)))
def test_onnxruntime_matches_eager(exported, shape):
    model, program, path = exported
    images = torch.randn(shape)
    with torch.no_grad():
        expected = model(images)
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    (logits,) = session.run(None, {'images': images.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=0, atol=1e-4)
    # the torch.export program the ONNX file was made from takes the same sizes
    with torch.no_grad():
        torch.testing.assert_close(program.exported_program.module()(images), expected, rtol=0, atol=1e-4)


# The registered architectures with their own window, focal levels and windows, expand sizes and
# embedding, at a small width and one block per stage. At that width the seven registered models are two
# layouts (the patch and the convolutional embedding): Focal-S, -B and -L differ from Focal-T only in the
# width, depths and heads it overrides, so exporting them again would test nothing more.
SMALL_WIDTH = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
REGISTERED = timm.list_models('focal_*')
LAYOUTS = ['focal_tiny_patch4_window7_224', 'focal_tiny_useconv_patch4_window7_224']
# (batch, height, width): the example's size, the model's minimum (every stage one window, the last
# map 1x1), non-square and odd (one window at the last stage's height, two at its width), and large.
EXPORT_CHECKS = [(2, 224, 224), (1, 32, 32), (3, 233, 301), (1, 1024, 1024)]


# the convolutional-embedding layout in the slow run only: the rest of its graph is the plain one's
@pytest.mark.parametrize('name', [LAYOUTS[0], pytest.param(LAYOUTS[1], marks=pytest.mark.slow)])
def test_torch_export_from_the_models_own_size_covers_its_minimum_to_2048(name):
    """torch.export from a 224 px example, where the last stage is one window and the third four:
    the exported program must take any batch, height and width in the dimensions' ranges and
    match eager PyTorch."""
    assert len(REGISTERED) == 7 and set(LAYOUTS) <= set(REGISTERED)
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL_WIDTH).eval()
    assert model.min_img_size == 32
    dynamic = {'x': {0: Dim('batch', min=1, max=64), 2: Dim('height', min=32, max=2048),
                     3: Dim('width', min=32, max=2048)}}
    program = torch.export.export(model, (torch.randn(EXAMPLE_SHAPE),), dynamic_shapes=dynamic).module()
    for batch, height, width in EXPORT_CHECKS:
        images = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            expected = model(images)
            torch.testing.assert_close(program(images), expected, rtol=0, atol=1e-4)
