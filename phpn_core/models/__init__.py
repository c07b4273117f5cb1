"""Classifiers in, (features, weight, bias) out.

- :mod:`~phpn_core.models.split`: :func:`split_classifier`, :func:`verify_split`, :func:`supported_architectures`;
  dispatches to one adapter module per backbone family:
- :mod:`~phpn_core.models.arch_names`: the architecture tables (a leaf: the adapters, the checks and the dispatch
  all stand on it, so nothing imports back up);
- :mod:`~phpn_core.models.extractor`: :class:`FeatureExtractor` and the checks every adapter shares (public names);
- :mod:`~phpn_core.models.torchvision_cnn`: ResNet, DenseNet, MobileNet V2/V3, EfficientNet, ConvNeXt, VGG-GAP;
- :mod:`~phpn_core.models.torchvision_transformers`: Swin v1/v2 (CLS-token ViTs refused, with the fix);
- :mod:`~phpn_core.models.timm_adapter`: timm models through timm's own API (timm imported only when used);
- :mod:`~phpn_core.models.generic`: ``.features`` + Linear models, GAP-ended Sequentials, explicit trunk + head;
- :mod:`~phpn_core.models.spec`: :class:`ModelSpec`, building a model from a config (checkpoint, torchvision weights
  by name, ``timm:<name>``) and safe checkpoint loading;
- :mod:`~phpn_core.models.synthparts_cnn`: the small CNN of the demo, its training and its safetensors format.

May import method, data, storage, config and errors; never evaluation or report. torchvision is imported by the
modules that need it, not here.
"""
