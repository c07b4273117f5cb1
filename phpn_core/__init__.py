"""phpn_core: the post-hoc part-prototype method and its data (no Prefect, no Ray).

Packages (each may import only what is listed; ``tests/test_architecture.py`` enforces it):

- :mod:`phpn_core.method`: NMF, per-class decomposition (scaling + refinement), the part-prototype head. Pure torch:
  nothing else of phpn_core.
- :mod:`phpn_core.models`: ``split_classifier`` and one adapter module per backbone family, model building and safe
  checkpoint loading, the synthparts CNN. May import method, data, storage, config, errors.
- :mod:`phpn_core.data`: datasets (synthparts, CUB-200-2011 layout, ImageFolder, Fashion-MNIST).
- :mod:`phpn_core.storage`: URIs, the Zarr feature store, chunk I/O, tensor files, the prototype registry.
- :mod:`phpn_core.extract`: feature extraction into a store (a package: features, schema, contract, pipeline,
  writer, checks).
- :mod:`phpn_core.evaluation`: accuracy parity, ProtoEval, faithfulness axioms, baselines, the suite.
- :mod:`phpn_core.report`: figures, the HTML report, single-image explanation.
- :mod:`phpn_core.config`, :mod:`phpn_core.errors`: the run config model and the error types.

Heavy names (torchvision, zarr, pydantic behind them) are imported on first use.
"""

from importlib import import_module

from phpn_core.method import (
    ClassDecomposition,
    Explanation,
    HeadDecomposition,
    NMFResult,
    PartPrototypeHead,
    decompose_class,
    decompose_head,
    nmf,
)

__version__ = "0.1.0"

# name -> module that defines it; imported on first attribute access (PEP 562)
_LAZY = {
    "split_classifier": "phpn_core.models.split",
    "supported_architectures": "phpn_core.models.split",
    "FeatureStore": "phpn_core.storage.feature_store",
    "FeatureSchema": "phpn_core.storage.schema",
    "PrototypeRegistry": "phpn_core.storage.registry",
    "extract_features": "phpn_core.extract",
    "load_config": "phpn_core.config",
    "RunConfig": "phpn_core.config",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'phpn_core' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "nmf", "NMFResult", "decompose_class", "decompose_head", "ClassDecomposition", "HeadDecomposition",
    "PartPrototypeHead", "Explanation", "split_classifier", "supported_architectures", "FeatureStore",
    "FeatureSchema", "PrototypeRegistry", "extract_features", "load_config", "RunConfig", "__version__",
]
