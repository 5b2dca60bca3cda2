"""UPerNet on a Focal Transformer, as Swin's ADE20K setting: segmentation_models_pytorch's `UPerNet`
with the `tu-focal_*` encoder, plus the auxiliary FCN head on the stage-3 map.

    from models.segmentation import FocalUPerNet
    model = FocalUPerNet('focal_tiny_patch4_window7_224', num_classes=150, drop_path_rate=0.3)
    logits, aux_logits = model.train()(images)   # both (B, classes, H, W)
    logits = model.eval()(images)

The auxiliary head is mmseg's FCNHead with one convolution (3x3 conv, BN, ReLU, dropout, 1x1
classifier) on the third stage's (normalised) map; it only trains the backbone (its loss is weighted by the
caller) and is unused at evaluation. As mmseg's decode heads, the main head applies a dropout
before its classifier. Any input size works: the image is padded at the bottom and right to the
encoder's output stride and the logits are cropped back.
"""
import segmentation_models_pytorch as smp
import torch.nn.functional as F
from torch import nn

AUX_STAGE = -2  # the encoder's features end with the stride-16 (stage 3) and stride-32 maps


class AuxiliaryFCNHead(nn.Sequential):
    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float):
        super().__init__(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(inplace=True), nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))


class FocalUPerNet(nn.Module):
    """smp's UPerNet on `tu-<focal_name>` and an auxiliary FCN head.

    `focal_kwargs` go to the Focal Transformer (timm's create_model): drop_path_rate, img_size,
    embed_dim, depths, ... `decoder_channels`: UPerNet's width (512 in Swin's setting);
    `aux_channels`: the FCN head's (256; 0 leaves the head out); `dropout`: before both classifiers.
    """

    def __init__(self, focal_name: str, num_classes: int, decoder_channels: int = 512, aux_channels: int = 256,
                 dropout: float = 0.1, **focal_kwargs):
        super().__init__()
        self.upernet = smp.UPerNet(f'tu-{focal_name}', encoder_weights=None, classes=num_classes,
                                   decoder_channels=decoder_channels, **focal_kwargs)
        self.dropout = nn.Dropout2d(dropout)
        self.aux_head = (AuxiliaryFCNHead(self.upernet.encoder.out_channels[AUX_STAGE], aux_channels, num_classes,
                                          dropout) if aux_channels > 0 else None)

    def forward(self, images):
        height, width = images.shape[-2:]
        stride = self.upernet.encoder.output_stride
        images = F.pad(images, [0, -width % stride, 0, -height % stride])
        features = self.upernet.encoder(images)
        logits = self.upernet.segmentation_head(self.dropout(self.upernet.decoder(features)))
        logits = logits[..., :height, :width]
        if not self.training or self.aux_head is None:
            return logits
        # the decoder's norm of that map, which in Swin's setting the backbone applies for both heads
        stage_map = self.upernet.decoder.feature_norms[AUX_STAGE](features[AUX_STAGE])
        aux = F.interpolate(self.aux_head(stage_map), size=images.shape[-2:], mode='bilinear',
                            align_corners=False)
        return logits, aux[..., :height, :width]
