"""The reference's golden cases (tests/reference/golden/*.json) rebuilt from their seeded recipe:
the model with its weights, the input, and what the reference computed for them (README there)."""
import json
import math
import zlib
from pathlib import Path

import torch

from models.focal_transformer import FocalTransformer

REFERENCE = Path(__file__).resolve().parent / 'reference'
LAYOUTS = REFERENCE / 'checkpoint_layouts.json'
# Named here rather than globbed, so that a missing file fails instead of shrinking the tests.
CASES = ('micro_conv_embed_224', 'micro_fc_224', 'micro_level3_conv_pool_224',
         'micro_mean_layerscale_prenorm_ape_224', 'micro_nofocal_192', 'micro_odd_232', 'micro_pad_256',
         'micro_shift_even_224', 'micro_small_160')
CASES_WITH_PROBES = ('micro_fc_224', 'micro_shift_even_224')


def seeded_normal(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    return ((actual - expected).norm() / expected.norm()).item()


class GoldenCase:
    def __init__(self, name: str):
        self.name = name
        self.data = json.loads((REFERENCE / 'golden' / f'{name}.json').read_text())
        self.kwargs = self.data['kwargs']
        self.seed = self.data['seed']
        self.output = torch.tensor(self.data['output'], dtype=torch.float64)

    def _name_seed(self, name: str) -> int:
        return self.seed * 1000003 + zlib.crc32(name.encode())

    def weights(self, dtype: torch.dtype = torch.float32) -> dict:
        """Every parameter as the reference drew it: a float32 draw, cast, then scaled (scaling
        before the cast puts float64 results 5e-8 off)."""
        return {name: seeded_normal(shape, self._name_seed(name)).to(dtype) * 0.2
                for name, shape in self.data['parameters'].items()}

    def model(self, dtype: torch.dtype = torch.float32) -> FocalTransformer:
        model = FocalTransformer(**self.kwargs).to(dtype)
        shapes = {name: list(p.shape) for name, p in model.named_parameters()}
        assert shapes == self.data['parameters'], f'{self.name}: parameters differ from the reference'
        weights = self.weights(dtype)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(weights[name])
        return model

    def reference_checkpoint(self) -> dict:
        """The weights as the reference's state_dict holds them: with an integer relative-position
        index table (ws², ws²) beside every block's (2ws-1)² x heads table, which this model
        derives instead of storing."""
        state_dict = self.weights()
        suffix = 'relative_position_bias_table'
        for name, shape in self.data['parameters'].items():
            if name.endswith(suffix):
                window_size = (math.isqrt(shape[0]) + 1) // 2
                state_dict[name.replace(suffix, 'relative_position_index')] = \
                    torch.zeros(window_size ** 2, window_size ** 2, dtype=torch.long)
        return state_dict

    def input(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        height, width = self.data['image_size']
        return seeded_normal((self.data['batch'], 3, height, width), self.seed).to(dtype)

    def loss_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """w of the gradient recipe: loss = (model(x) * w).sum()."""
        return seeded_normal(self.output.shape, self.seed + 1).to(dtype)

    @property
    def loss(self) -> float:
        return self.data['loss']

    @property
    def gradient_probes(self) -> dict:
        return {name: torch.tensor(probe, dtype=torch.float64) for name, probe in self.data['gradient_probes'].items()}

    def probes_of(self, model: FocalTransformer) -> dict:
        """[sum of squares, dot product with the seeded direction] of every parameter's gradient."""
        probes = {}
        for name, parameter in model.named_parameters():
            grad = parameter.grad.detach().cpu().double()
            direction = seeded_normal(parameter.shape, self._name_seed(name) + 1).double()
            probes[name] = torch.stack([grad.square().sum(), (grad * direction).sum()])
        return probes
