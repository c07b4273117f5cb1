"""Where tensors live between tasks, by URI (a local path or ``s3://bucket/prefix``; fsspec and Zarr 3).

- :mod:`~phpn_core.storage.uri`: parsing URIs, storage options from the environment, redaction, safe joins;
- :mod:`~phpn_core.storage.schema`: :class:`FeatureSchema` (a store's identity and shape) and the chunk layout;
- :mod:`~phpn_core.storage.feature_store`: :class:`FeatureStore`, class-contiguous feature maps in Zarr chunks
  (its layout: create, open, resume, indices), with :mod:`~phpn_core.storage.feature_writes` (chunk writes),
  :mod:`~phpn_core.storage.feature_reads` (class reads), :mod:`~phpn_core.storage.feature_checks` (argument checks)
  and :mod:`~phpn_core.storage.zarr_group` (the Zarr group, storage errors without credentials);
- :mod:`~phpn_core.storage.chunkio`: whole-chunk encoding and concurrent puts (the store's fast write path);
- :mod:`~phpn_core.storage.tensorio`: single safetensors files by URI (heads, checkpoints' tensors);
- the prototype registry, in layers: :mod:`~phpn_core.storage.registry_format` (object formats and checks) <-
  :mod:`~phpn_core.storage.registry_objects` (storage primitives) <- :mod:`~phpn_core.storage.registry_staging`
  (staged classes) <- :mod:`~phpn_core.storage.registry_publishing` (atomic publishing, metrics) <-
  :mod:`~phpn_core.storage.registry` (:class:`PrototypeRegistry`: naming, verified reading, removal).

May import method (the head's save format), config and errors; never models, data, evaluation or report.
"""
