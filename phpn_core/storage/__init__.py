"""Where tensors live between tasks, by URI (a local path or ``s3://bucket/prefix``; fsspec and Zarr 3).

- :mod:`~phpn_core.storage.uri`: parsing URIs, storage options from the environment, redaction, safe joins;
- :mod:`~phpn_core.storage.schema`: :class:`FeatureSchema` (a store's identity and shape) and the chunk layout;
- :mod:`~phpn_core.storage.feature_store`: :class:`FeatureStore`, class-contiguous feature maps in Zarr chunks;
- :mod:`~phpn_core.storage.chunkio`: whole-chunk encoding and concurrent puts (the store's fast write path);
- :mod:`~phpn_core.storage.tensorio`: single safetensors files by URI (heads, checkpoints' tensors);
- :mod:`~phpn_core.storage.registry_format` and :mod:`~phpn_core.storage.registry`: the prototype registry's object
  formats and checks, and :class:`PrototypeRegistry` (staging, atomic publishing, verified reading).

May import method (the head's save format), config and errors; never models, data, evaluation or report.
"""
