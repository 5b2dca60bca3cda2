"""Fixtures shared by the model tests."""
import pytest

from models.window_attention import set_cpu_attention


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
