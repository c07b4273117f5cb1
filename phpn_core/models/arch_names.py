"""The names of the architectures that ``split_classifier`` recognises, as plain data: the torchvision adapters
identify a model by its structure through these tables, and error messages list the names. A leaf module (no phpn
imports), so the adapters, the shared checks and the registry in :mod:`phpn_core.models.split` all stand on it."""

from __future__ import annotations

__all__ = [
    "CONVNEXT_NAMES", "DENSENET_NAMES", "EFFICIENTNET_NAMES", "MOBILENET_V3_NAMES", "RESNET_NAMES", "SWIN_NAMES",
    "VGG_CFG", "supported_architectures", "torchvision_cnn_architectures", "torchvision_transformer_architectures",
]

RESNET_NAMES: dict[tuple[str, tuple[int, ...], int, int], str] = {
    ("BasicBlock", (2, 2, 2, 2), 1, 64): "resnet18",
    ("BasicBlock", (3, 4, 6, 3), 1, 64): "resnet34",
    ("Bottleneck", (3, 4, 6, 3), 1, 64): "resnet50",
    ("Bottleneck", (3, 4, 23, 3), 1, 64): "resnet101",
    ("Bottleneck", (3, 8, 36, 3), 1, 64): "resnet152",
    ("Bottleneck", (3, 4, 6, 3), 32, 4): "resnext50_32x4d",
    ("Bottleneck", (3, 4, 23, 3), 32, 8): "resnext101_32x8d",
    ("Bottleneck", (3, 4, 23, 3), 64, 4): "resnext101_64x4d",
    ("Bottleneck", (3, 4, 6, 3), 1, 128): "wide_resnet50_2",
    ("Bottleneck", (3, 4, 23, 3), 1, 128): "wide_resnet101_2",
}
# (growth rate, layers per dense block)
DENSENET_NAMES: dict[tuple[int, tuple[int, ...]], str] = {
    (32, (6, 12, 24, 16)): "densenet121",
    (48, (6, 12, 36, 24)): "densenet161",
    (32, (6, 12, 32, 32)): "densenet169",
    (32, (6, 12, 48, 32)): "densenet201",
}
# (stem channels, number of MBConv/FusedMBConv blocks, last conv channels); measured on torchvision 0.29.
EFFICIENTNET_NAMES: dict[tuple[int, int, int], str] = {
    (32, 16, 1280): "efficientnet_b0",
    (32, 23, 1280): "efficientnet_b1",
    (32, 23, 1408): "efficientnet_b2",
    (40, 26, 1536): "efficientnet_b3",
    (48, 32, 1792): "efficientnet_b4",
    (48, 39, 2048): "efficientnet_b5",
    (56, 45, 2304): "efficientnet_b6",
    (64, 55, 2560): "efficientnet_b7",
    (24, 40, 1280): "efficientnet_v2_s",
    (24, 57, 1280): "efficientnet_v2_m",
    (32, 79, 1280): "efficientnet_v2_l",
}
# last conv channels at width 1.0
MOBILENET_V3_NAMES: dict[int, str] = {576: "mobilenet_v3_small", 960: "mobilenet_v3_large"}
# (stem channels, blocks per stage)
CONVNEXT_NAMES: dict[tuple[int, tuple[int, ...]], str] = {
    (96, (3, 3, 9, 3)): "convnext_tiny",
    (96, (3, 3, 27, 3)): "convnext_small",
    (128, (3, 3, 27, 3)): "convnext_base",
    (192, (3, 3, 27, 3)): "convnext_large",
}
VGG_CFG: dict[str, tuple[str, bool]] = {
    f"vgg{depth}{suffix}": (cfg, suffix == "_bn")
    for depth, cfg in ((11, "A"), (13, "B"), (16, "D"), (19, "E"))
    for suffix in ("", "_bn")
}

# (patch-embedding channels, blocks per stage, v2) -> name; torchvision 0.29
SWIN_NAMES: dict[tuple[int, tuple[int, ...], bool], str] = {
    (96, (2, 2, 6, 2), False): "swin_t",
    (96, (2, 2, 18, 2), False): "swin_s",
    (128, (2, 2, 18, 2), False): "swin_b",
    (96, (2, 2, 6, 2), True): "swin_v2_t",
    (96, (2, 2, 18, 2), True): "swin_v2_s",
    (128, (2, 2, 18, 2), True): "swin_v2_b",
}


def torchvision_cnn_architectures() -> list[str]:
    """The torchvision CNN names (``FeatureExtractor.arch``) of :mod:`phpn_core.models.torchvision_cnn`."""
    names = list(RESNET_NAMES.values()) + list(DENSENET_NAMES.values()) + ["mobilenet_v2"]
    names += list(MOBILENET_V3_NAMES.values()) + list(EFFICIENTNET_NAMES.values())
    names += list(CONVNEXT_NAMES.values()) + [f"{name}_gap" for name in VGG_CFG]
    return names


def torchvision_transformer_architectures() -> list[str]:
    """The torchvision transformer names of :mod:`phpn_core.models.torchvision_transformers`."""
    return list(SWIN_NAMES.values())


def supported_architectures() -> list[str]:
    """Names of the architectures ``split_classifier`` recognises, as reported in ``FeatureExtractor.arch``.

    Besides these, generic modules with ``.features`` + a Linear ``.classifier``/``.fc``, ``nn.Sequential`` models
    ending in GAP + Flatten + Linear, and explicit ``features=``/``head=`` are accepted (see
    :mod:`phpn_core.models.split`), and timm models with an average-pool (+ LayerNorm) + linear head.
    """
    return torchvision_cnn_architectures() + torchvision_transformer_architectures()
