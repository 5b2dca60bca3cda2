"""Fixtures shared by the model tests."""
import pytest

import models.focal_transformer as focal_transformer


@pytest.fixture(params=['fused-kernel', 'materialised-logits'])
def cpu_attention(request, monkeypatch):
    """Runs a test once on each CPU attention path, forced for every block: PyTorch's fused kernel, and
    the logits materialised between batched products (which the model takes for float32/float64 blocks
    whose logits are small, per MATERIALISED_LOGITS_MAX_BYTES)."""
    monkeypatch.setattr(focal_transformer, 'MATERIALISED_LOGITS_MAX_BYTES',
                        0 if request.param == 'fused-kernel' else float('inf'))
    return request.param
