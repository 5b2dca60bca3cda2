"""BiFPN, the weighted bidirectional feature pyramid of EfficientDet (Tan et al., 2020), as the neck of
Swin's RepPointsV2 3x recipe (configs/_base_/models/reppointsv2_swin_bifpn.py in
SwinTransformer/Swin-Transformer-Object-Detection: in [192, 384, 768], 256 channels, 5 outputs,
2 repeats, GroupNorm on every convolution, no activation after them).

    neck = BiFPN([192, 384, 768], 256, num_outputs=5, repeats=2)
    levels = neck(OrderedDict(('0', c3), ('1', c4), ('2', c5)))  # P3..P7, each 256 channels

The levels past the inputs are max-pooled (3x3, stride 2) from the last input; every repeat then
fuses each level with its neighbours top-down and bottom-up through learnt, non-negative weights
normalised to sum to one ("fast normalised fusion") followed by swish and a 3x3 convolution.
It takes and returns the OrderedDict of maps that torchvision's FeaturePyramidNetwork does, so
that it serves as `FocalFPN`'s neck.
"""
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['BiFPN', 'group_norm']

GROUPS = 32  # GroupNorm groups of the recipe's norm_cfg


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the recipe's 32 groups, or half as many groups as `channels` where that is
    fewer (narrow demo widths): a group of one channel has a single value on a 1x1 level of a
    single image, which GroupNorm refuses."""
    return nn.GroupNorm(min(GROUPS, channels // 2), channels)


def conv_norm(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Convolution (no bias: the norm has one) and GroupNorm, no activation, as the recipe's
    BiFPN convolutions."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.xavier_uniform_(conv.weight)  # the neck's init_weights: xavier, uniform
    return nn.Sequential(conv, group_norm(out_channels))


class WeightedFusion(nn.Module):
    """Swish of the inputs' sum under learnt weights, ReLU-clipped and normalised to sum to one."""

    EPSILON = 1e-4  # EfficientDet's, keeps the normalisation finite when every weight is clipped

    def __init__(self, num_inputs: int):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(num_inputs))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        weights = F.relu(self.weights)
        weights = weights / (weights.sum() + self.EPSILON)
        return F.silu(sum(weight * tensor for weight, tensor in zip(weights, inputs)))


class BiFPNLayer(nn.Module):
    """One repeat: a 1x1 lateral projection of each input whose width differs, a top-down pass
    (each level fused with the upsampled level above), then a bottom-up pass (each level fused
    with the max-pooled level below, its top-down map and, except at the top, its lateral)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Identity() if width == out_channels else conv_norm(width, out_channels, 1)
                                      for width in in_channels)
        levels = len(in_channels)
        self.top_down_fusions = nn.ModuleList(WeightedFusion(2) for _ in range(levels - 1))
        self.top_down_convs = nn.ModuleList(conv_norm(out_channels, out_channels, 3) for _ in range(levels - 1))
        self.bottom_up_fusions = nn.ModuleList(WeightedFusion(3 if level < levels - 1 else 2)
                                               for level in range(1, levels))
        self.bottom_up_convs = nn.ModuleList(conv_norm(out_channels, out_channels, 3) for _ in range(levels - 1))

    def forward(self, maps: list) -> list:
        laterals = [lateral(level_map) for lateral, level_map in zip(self.laterals, maps)]
        outputs = list(laterals)
        for level in range(len(outputs) - 1, 0, -1):
            above = F.interpolate(outputs[level], size=outputs[level - 1].shape[-2:], mode='nearest')
            fused = self.top_down_fusions[level - 1]([outputs[level - 1], above])
            outputs[level - 1] = self.top_down_convs[level - 1](fused)
        for level in range(1, len(outputs)):
            below = F.max_pool2d(outputs[level - 1], 3, stride=2, padding=1)
            inputs = [below, outputs[level]] + ([laterals[level]] if level < len(outputs) - 1 else [])
            outputs[level] = self.bottom_up_convs[level - 1](self.bottom_up_fusions[level - 1](inputs))
        return outputs


class BiFPN(nn.Module):
    """`repeats` BiFPN layers over the input maps and the max-pooled levels above them.

    `in_channels`: widths of the input maps, finest first. `num_outputs`: levels returned (the
    inputs and `num_outputs - len(in_channels)` pooled ones). The first layer projects every
    input (pooled levels keep the last input's width) to `out_channels`; later ones take them as
    they are.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_outputs: int = 5,
                 repeats: int = 2):
        super().__init__()
        in_channels = list(in_channels)
        if num_outputs < len(in_channels) or repeats < 1:
            raise ValueError(f'BiFPN needs num_outputs >= {len(in_channels)} inputs and repeats >= 1, '
                             f'got {num_outputs} and {repeats}')
        self.extra_levels = num_outputs - len(in_channels)
        widths = in_channels + [in_channels[-1]] * self.extra_levels
        self.layers = nn.ModuleList(BiFPNLayer(widths if index == 0 else [out_channels] * num_outputs,
                                               out_channels) for index in range(repeats))
        self.out_channels = out_channels

    def forward(self, maps: 'OrderedDict[str, torch.Tensor]') -> 'OrderedDict[str, torch.Tensor]':
        levels = list(maps.values())
        for _ in range(self.extra_levels):
            levels.append(F.max_pool2d(levels[-1], 3, stride=2, padding=1))
        for layer in self.layers:
            levels = layer(levels)
        return OrderedDict((str(index), level) for index, level in enumerate(levels))
