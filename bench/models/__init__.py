"""One file per architecture.  ARCHS maps `model.arch` to (config class, model class)."""

from bench.models.vit import ViT, ViTConfig

ARCHS = {"vit": (ViTConfig, ViT)}
