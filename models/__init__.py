"""Focal Transformer models; importing registers the six released variants with timm."""
from .build import build_model
from .focal_transformer import FocalTransformer, checkpoint_filter_fn

__all__ = ['build_model', 'FocalTransformer', 'checkpoint_filter_fn']
