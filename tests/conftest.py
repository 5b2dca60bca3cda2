"""Fixtures shared by the model tests."""
import pytest
import torch

import models.focal_transformer as focal_transformer


@pytest.fixture(params=['fused-kernel', 'materialised-logits', 'materialised-logits-small-chunks'])
def cpu_attention(request, monkeypatch):
    """Runs a test on each CPU attention path: PyTorch's fused kernel (which the model takes in float16,
    and in bf16 on CPUs without bf16 instructions), the logits materialised a chunk of windows at a time
    (float32, float64 and bf16, here on any CPU), and the same with chunks of a few windows (1000
    bytes of logits), so that an image takes several and the last is short."""
    if request.param == 'fused-kernel':
        monkeypatch.setattr(focal_transformer, 'MATERIALISED_DTYPES', ())
    else:
        monkeypatch.setattr(focal_transformer, 'MATERIALISED_DTYPES', (torch.float32, torch.float64, torch.bfloat16))
    if request.param == 'materialised-logits-small-chunks':
        monkeypatch.setattr(focal_transformer, 'MATERIALISED_CHUNK_BYTES', 1000)
    return request.param
