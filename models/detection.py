"""A Focal Transformer with torchvision's feature pyramid: the backbone of torchvision's detectors.

    from torchvision.models.detection import MaskRCNN, RetinaNet
    from models.detection import LastLevelP6P7, focal_fpn_backbone

    backbone = focal_fpn_backbone('focal_tiny_patch4_window7_224', pretrained='focal-tiny-is224-ws7.pth',
                                  drop_path_rate=0.2, frozen_stages=0)
    detector = MaskRCNN(backbone, num_classes=91)
    # RetinaNet and FCOS read P3-P7: stages 1-3 and two extra levels
    backbone = focal_fpn_backbone('focal_tiny_patch4_window7_224', returned_stages=(1, 2, 3),
                                  extra_blocks=LastLevelP6P7(256, 256))

The backbone returns the OrderedDict of maps ('0', '1', ... and the extra levels) that torchvision's
detectors expect and says its width in `out_channels`. As Swin's detection backbone, each returned
stage map gets its own LayerNorm before the pyramid.
"""
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import feature_pyramid_network
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from .backbone import find_focal, load_pretrained, no_weight_decay_names

__all__ = ['FocalFPN', 'LastLevelP6P7', 'focal_fpn_backbone']


class LastLevelP6P7(feature_pyramid_network.LastLevelP6P7):
    """torchvision's P6 and P7 (3x3 convolutions of stride 2), in float32 under CPU autocast where the
    map they start from is at most two columns wide. There, oneDNN's bf16 weight gradient of a stride-2
    convolution over a one-column map leaves the taps that only see padding unwritten (PyTorch 2.14.1):
    whatever the memory held, NaN included, became the gradient (the digit demos' 1-pixel P6 and P7)."""

    def forward(self, p, c, names):
        x = p[-1] if self.use_P5 else c[-1]
        if not (x.device.type == 'cpu' and torch.is_autocast_enabled('cpu') and x.shape[-1] <= 2):
            return super().forward(p, c, names)
        with torch.autocast('cpu', enabled=False):
            p6 = self.p6(x.float())
            p7 = self.p7(F.relu(p6))
        return p + [p6.to(p[-1].dtype), p7.to(p[-1].dtype)], names + ['p6', 'p7']  # as autocast's would be


class FocalFPN(nn.Module):
    """Focal Transformer stages, a LayerNorm per returned stage, and a FeaturePyramidNetwork.

    `body`: a FocalTransformer, pruned to what the returned maps need (no classifier, no final
    norm, no stage after the last returned one).
    `returned_stages`: the stages whose maps feed the pyramid, in increasing order.
    `extra_blocks`: torchvision's extra pyramid levels (LastLevelMaxPool for the R-CNN family,
    LastLevelP6P7 for RetinaNet and FCOS); None adds none.
    `frozen_stages`: -1 trains everything; 0 freezes the patch embedding (and absolute position
    embedding); k >= 1 also freezes stages 0..k-1 (each with its downsampling): `FocalTransformer.freeze`,
    whose frozen parts keep `requires_grad=False` and stay in eval mode (no drop path) when the detector trains.
    `neck`: builds another pyramid from the returned stages' widths (RepPointsV2's BiFPN), a module
    that maps the OrderedDict of stage maps to the pyramid's and says its width in `out_channels`;
    `out_channels` and `extra_blocks` are then unused.
    """

    def __init__(self, body: nn.Module, returned_stages: Sequence[int] = (0, 1, 2, 3), out_channels: int = 256,
                 extra_blocks: Optional[ExtraFPNBlock] = None, frozen_stages: int = -1,
                 neck: Optional[Callable[[list], nn.Module]] = None):
        super().__init__()
        if not isinstance(body, nn.Module) or find_focal(body)[1] is not body:
            raise ValueError(f'body must be a FocalTransformer, got {type(body).__name__}')
        num_stages = len(body.layers)
        returned_stages = list(returned_stages)
        if not returned_stages or returned_stages != sorted(set(returned_stages)) or \
                not all(0 <= stage < num_stages for stage in returned_stages):
            raise ValueError(f'returned_stages {returned_stages} must be increasing stage indices '
                             f'in [0, {num_stages - 1}]')
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages {frozen_stages} must lie in [-1, {num_stages}]')
        # Drop what the maps do not use (final norm, classifier, later stages): DDP rejects
        # parameters that get no gradient.
        body.prune_intermediate_layers(returned_stages, prune_norm=True)
        self.body = body
        self.returned_stages = returned_stages
        widths = [body.feature_info[stage]['num_chs'] for stage in returned_stages]
        self.stage_norms = nn.ModuleList(nn.LayerNorm(width) for width in widths)
        self.fpn = neck(widths) if neck is not None else FeaturePyramidNetwork(widths, out_channels,
                                                                                extra_blocks=extra_blocks)
        self.out_channels = self.fpn.out_channels if neck is not None else out_channels
        body.freeze(min(frozen_stages, len(body.layers)))  # a stage pruned away needs no freezing

    def forward(self, images: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        maps = self.body.forward_intermediates(images, indices=self.returned_stages, output_fmt='NHWC',
                                               intermediates_only=True)
        normed = OrderedDict((str(index), norm(stage_map).permute(0, 3, 1, 2))
                             for index, (norm, stage_map) in enumerate(zip(self.stage_norms, maps)))
        return self.fpn(normed)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Names (in this module) of the Focal parameters that train without weight decay."""
        return no_weight_decay_names(self)


def focal_fpn_backbone(model_name: str = 'focal_tiny_patch4_window7_224', pretrained: Optional[str] = None,
                       returned_stages: Sequence[int] = (0, 1, 2, 3), out_channels: int = 256,
                       extra_blocks: Optional[ExtraFPNBlock] = None, frozen_stages: int = -1,
                       drop_path_rate: float = 0.2, neck: Optional[Callable[[list], nn.Module]] = None,
                       **model_kwargs) -> FocalFPN:
    """A `FocalFPN` on timm's `model_name`, ready for torchvision's MaskRCNN / FasterRCNN (the
    default: four stages and a max-pooled fifth level) or RetinaNet / FCOS (`returned_stages=(1, 2, 3)`,
    `extra_blocks=LastLevelP6P7(out_channels, out_channels)`).

    `pretrained`: path or URL of a classification checkpoint (released, training, .pdparams or
    safetensors), loaded into the stages with the focal tables fitted to their geometry
    (`models.backbone.load_pretrained`). `neck`: as FocalFPN's (e.g.
    `functools.partial(BiFPN, out_channels=256)` for RepPointsV2). `drop_path_rate` and `model_kwargs` (any
    architecture argument of FocalTransformer, e.g. `focal_windows`) go to `timm.create_model`.
    """
    body = timm.create_model(model_name, num_classes=0, drop_path_rate=drop_path_rate, **model_kwargs)
    if pretrained is not None:
        load_pretrained(body, pretrained)
    if extra_blocks is None:
        extra_blocks = LastLevelMaxPool()
    return FocalFPN(body, returned_stages, out_channels, extra_blocks, frozen_stages, neck)
