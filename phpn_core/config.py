"""The one configuration model of a phpn run (pydantic v2, frozen, unknown keys refused).

Built once at the entry point (CLI or deployment) from YAML or keywords and passed down; nothing reads it at
import time. ``RunConfig.digest()`` identifies the decomposition: the registry entry is keyed by it, so a
re-run of the same config finds (and reuses) every class it already finished.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from phpn_core.errors import ConfigError
from phpn_core.storage.uri import parse_uri

__all__ = [
    "ModelConfig", "DatasetConfig", "DecomposeConfig", "ComputeConfig", "StorageConfig", "EvalConfig",
    "ProtoPNetRunConfig",
    "RunConfig", "SweepConfig", "load_config", "load_sweep", "format_validation_error",
]


class _Frozen(BaseModel):
    # allow_inf_nan=False: a NaN or infinite number is never a meaningful setting (e.g. refine_ridge: .inf).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(_Frozen):
    """The classifier: a torchvision/phpn architecture or ``timm:<name>`` with a user checkpoint (state dict), a
    torchvision architecture with ``weights`` by name (e.g. ``IMAGENET1K_V1``, read from ``$TORCH_HOME``), or the
    synthparts CNN (trained by the run when ``checkpoint`` is None)."""

    arch: str = "synthparts_cnn"
    checkpoint: str | None = None
    weights: str | None = Field(
        default=None, description="torchvision weights enum member name (e.g. IMAGENET1K_V1), loaded from "
                                  "$TORCH_HOME/hub/checkpoints; exclusive with checkpoint; torchvision archs only")
    num_classes: int | None = Field(default=None, ge=1)
    train_epochs: int = Field(default=8, ge=1, description="synthparts_cnn only: epochs when training it")
    feature_stride: Literal[8, 16] = Field(
        default=8, description="synthparts_cnn only: total stride of its feature map (8: 14x14 at 112 px, finer "
                               "part localisation; 16: 7x7, cheaper)")

    @model_validator(mode="after")
    def _needs_checkpoint(self):
        if self.weights is not None and self.checkpoint is not None:
            raise ValueError(
                f"model.checkpoint={self.checkpoint!r} and model.weights={self.weights!r} are both set: expected one "
                "source of weights. Fix: keep only one."
            )
        if self.weights is not None and (self.arch == "synthparts_cnn" or self.arch.startswith("timm:")):
            raise ValueError(
                f"model.weights={self.weights!r} is for torchvision architectures only, got arch={self.arch!r}. Fix: "
                "use model.checkpoint (for timm: the model.safetensors / pytorch_model.bin downloaded from its hub "
                "page, or your own state dict)."
            )
        if self.arch != "synthparts_cnn" and self.checkpoint is None and self.weights is None:
            raise ValueError(
                f"model.checkpoint or model.weights is required for arch={self.arch!r}: a state dict saved with "
                "torch.save(model.state_dict(), path) or safetensors (timm:<name> too), or for a torchvision "
                "architecture weights by name (e.g. weights: IMAGENET1K_V1, read from $TORCH_HOME/hub/checkpoints); "
                "only synthparts_cnn is trained by phpn."
            )
        if self.checkpoint is not None and not Path(self.checkpoint).expanduser().is_file():
            raise ValueError(f"model.checkpoint: no file at {self.checkpoint!r}; give the path of an existing state dict.")
        return self


class DatasetConfig(_Frozen):
    kind: Literal["synthparts", "cub200", "imagefolder", "fashion_mnist"] = "synthparts"
    root: str | None = None
    image_size: int = Field(default=112, ge=16, le=4096)
    n_classes: int = Field(default=8, ge=1, description="synthparts only")
    train_per_class: int = Field(default=50, ge=1, description="synthparts only")
    test_per_class: int = Field(default=20, ge=1, description="synthparts only")
    part_variants: int = Field(default=1, ge=1, le=3, description="synthparts only: 2 or 3 add colour variants of "
                                                                 "every part type, for more than 165 classes")
    crop_to_bbox: bool = Field(default=True, description="cub200 only: crop test images to the bird, as ProtoEval")
    on_error: Literal["raise", "skip"] = "raise"
    seed: int = 0
    class_map: str | None = Field(
        default=None, description="imagefolder only: JSON file {folder name: head row} (e.g. ImageNet indices of "
                                  "your folders); None: folders in name order are rows 0, 1, ...")
    max_per_class: int | None = Field(
        default=None, ge=1, description="a seeded (dataset.seed) per-class sample of at most this many training "
                                        "images; None: all of them")

    @model_validator(mode="after")
    def _root(self):
        if self.kind in ("cub200", "imagefolder") and not self.root:
            raise ValueError(f"dataset.root is required for kind={self.kind!r}: the dataset's directory.")
        if self.root and self.kind != "synthparts" and not Path(self.root).expanduser().is_dir():
            raise ValueError(f"dataset.root: no directory at {self.root!r}.")
        if self.class_map is not None:
            if self.kind != "imagefolder":
                raise ValueError(f"dataset.class_map applies to kind 'imagefolder' only, got kind={self.kind!r}; "
                                 "remove class_map or set kind: imagefolder.")
            if not Path(self.class_map).expanduser().is_file():
                raise ValueError(f"dataset.class_map: no file at {self.class_map!r}; give the path of a JSON file "
                                 '{"folder name": head row, ...}.')
        return self


class DecomposeConfig(_Frozen):
    k: int = Field(default=5, ge=1, description="prototypes per class; 'auto': a redundancy-aware k per class, "
                                                "at most k_cap (sets k = k_cap and k_auto = true)")
    k_auto: bool = Field(default=False, description="k is a cap: a class whose two prototypes have duplicate maps "
                                                    "on its training features gets one fewer, until none has")
    k_cap: int = Field(default=5, ge=1, description="the largest k with k: auto")
    k_auto_threshold: float = Field(default=0.9, ge=-1, le=1, description="k_auto: the map cosine above which two "
                                                                           "prototypes are duplicates")

    @model_validator(mode="before")
    @classmethod
    def _k_auto(cls, data):
        if isinstance(data, dict) and data.get("k") == "auto":
            data = {**data, "k": data.get("k_cap", 5), "k_auto": True}
        return data
    classes: list[int] | None = Field(
        default=None, description="head rows to decompose (None: every row with training images); the other rows "
                                  "keep their linear row, so the logits of all C classes are unchanged")

    @field_validator("classes")
    @classmethod
    def _rows(cls, v):
        if v is not None:
            if not v or any(c < 0 for c in v) or len(set(v)) != len(v):
                raise ValueError(f"decompose.classes must be a non-empty list of distinct head rows >= 0, got {v}; "
                                 "list each row once, or leave the key out to decompose every row with images.")
            v = sorted(v)
        return v
    seed: int = 0
    normalization: Literal["l2", "none"] = "l2"
    target: Literal["residual", "prototype"] = "residual"
    discovery: Literal["auto", "nmf", "hybrid_nmf", "posneg_nmf", "semi_nmf", "shift_nmf"] = Field(
        default="auto", description="initial prototypes: NMF for non-negative features, hybrid_nmf for signed ones "
                                    "(auto); or one method for every class (see phpn_core.method.decompose)")
    refine_ridge: float = Field(default=1e-3, ge=0)
    refine_iter: int = Field(default=100, ge=0)
    nmf_max_iter: int = Field(default=500, ge=1)
    nmf_tol: float = Field(default=1e-6, ge=0)
    nmf_sparsity: float = Field(default=0.0, ge=0, allow_inf_nan=False,
                                description="L1 weight on the NMF coefficients (0: plain NMF): each position is "
                                            "explained by fewer prototypes, so each covers one part")

    def nmf_options(self) -> dict:
        opts = {"max_iter": self.nmf_max_iter, "tol": self.nmf_tol}
        if self.nmf_sparsity:
            opts["sparsity"] = self.nmf_sparsity
        return opts

    def head_options(self) -> dict:
        """The keyword options of :func:`phpn_core.method.decompose.decompose_head` that this section sets."""
        return {"normalization": self.normalization, "target": self.target, "refine_ridge": self.refine_ridge,
                "refine_iter": self.refine_iter, "discovery": self.discovery, "nmf_options": self.nmf_options(),
                "auto_k": self.k_auto, "auto_k_threshold": self.k_auto_threshold}


class ComputeConfig(_Frozen):
    ray_address: str | None = Field(default=None, description="None: a local Ray sized to the machine")
    num_cpus: int | None = Field(default=None, ge=1)
    classes_per_task: int = Field(default=4, ge=1)
    cpus_per_task: float = Field(default=1.0, gt=0)
    gpus_per_task: float = Field(default=0.0, ge=0, description="requested only when the cluster has GPUs")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=64, ge=1)
    extract_tasks: int | None = Field(
        default=None, ge=1, description="feature extraction as this many Ray tasks over disjoint chunk ranges of "
                                        "one store (num_gpus each where the cluster has GPUs; resumable); None: one "
                                        "extraction in the driver")
    feature_dtype: Literal["float16", "float32"] = "float32"
    feature_compression: Literal["zstd", "lz4", "none"] = Field(
        default="zstd", description="feature-chunk compression (zstd level 1; lz4; none: fastest writes)")
    shard_resources: list[str] = Field(
        default_factory=list,
        description="Ray custom resources to pin decomposition shards to, round-robin (shard i needs a "
                    "sliver of shard_resources[i % len]); [] = no pinning. Start each node with its own "
                    "resource, e.g. `ray start --resources '{\"node_b\": 1}'`",
    )


class StorageConfig(_Frozen):
    """Where tensors live. None: under the run's output directory. ``s3://`` URIs take credentials and the
    endpoint from the environment (AWS_*), never from this file."""

    features_uri: str | None = None
    registry_uri: str | None = None

    @field_validator("features_uri", "registry_uri")
    @classmethod
    def _valid_uri(cls, v):
        if v is not None:
            parse_uri(v)
        return v


class EvalConfig(_Frozen):
    enabled: bool = True
    box_half_size: float = Field(default=36.0, gt=0, description="at 224 px; scaled with the image size")
    threshold: float = Field(default=0.8, gt=0, le=1)
    noise_std: float = Field(default=0.2, ge=0)
    noise_clip: float = Field(default=0.25, ge=0)
    seed: int = 0
    baselines: bool = True
    report: bool = True
    keypoint_free: bool = Field(default=True, description="deletion/insertion AUC, box stability, redundancy")
    keypoint_free_images: int | None = Field(default=4, ge=1, description="test images per class with "
                                             "deletion/insertion curves (None: all); the other metrics use all")
    keypoint_free_steps: int = Field(default=16, ge=2, description="perturbation steps of each curve")


class ProtoPNetRunConfig(_Frozen):
    """The ProtoPNet baseline (``phpn baseline protopnet``): trained on the run's trunk and data. A key left None
    takes :class:`phpn_core.protopnet.train.ProtoPNetConfig`'s default (the official recipe, epochs scaled for a
    CPU run; see that module for every deviation)."""

    prototypes_per_class: int | None = Field(default=None, ge=1, description="m (official: 10)")
    prototype_dim: int | None = Field(default=None, ge=1, description="d (official: 128)")
    warm_epochs: int | None = Field(default=None, ge=0)
    joint_epochs: int | None = Field(default=None, ge=0)
    last_layer_epochs: int | None = Field(default=None, ge=0)
    batch_size: int | None = Field(default=None, ge=1)
    seed: int = Field(default=0, ge=0, description="initialisation, shuffling and augmentation")

    def options(self) -> dict[str, Any]:
        """The keys that are set, as ProtoPNetConfig keywords (``seed`` excluded)."""
        return {k: v for k, v in self.model_dump().items() if v is not None and k != "seed"}


class RunConfig(_Frozen):
    name: str = Field(default="run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    model: ModelConfig = ModelConfig()
    dataset: DatasetConfig = DatasetConfig()
    decompose: DecomposeConfig = DecomposeConfig()
    compute: ComputeConfig = ComputeConfig()
    storage: StorageConfig = StorageConfig()
    evaluate: EvalConfig = EvalConfig()
    protopnet: ProtoPNetRunConfig = ProtoPNetRunConfig()

    def digest(self) -> str:
        """Digest of what determines the prototypes (model, data, decomposition), not of compute or storage."""
        dec = self.decompose.model_dump()
        # options added later leave the digests of configs that do not use them as they were (registry entries
        # made before stay found); k_cap is in k already
        for name in ("k_cap",) if self.decompose.k_auto else ("k_auto", "k_cap", "k_auto_threshold"):
            dec.pop(name)
        if not dec["nmf_sparsity"]:
            dec.pop("nmf_sparsity")
        return self._digest_of({"decompose": dec})

    def protopnet_digest(self) -> str:
        """Digest of what determines a ProtoPNet baseline: model, data and the ``protopnet`` section."""
        return self._digest_of({"kind": "protopnet", "protopnet": self.protopnet.model_dump()})

    def _digest_of(self, method: dict[str, Any]) -> str:
        data = self.dataset.model_dump()
        if data["part_variants"] == 1:  # added later: the default leaves earlier digests unchanged
            data.pop("part_variants")
        ident = {"model": self.model.model_dump(), "dataset": data, **method}
        if self.model.checkpoint:
            ident["checkpoint_sha256"] = _file_sha256(self.model.checkpoint)
        if self.dataset.class_map:
            ident["class_map_sha256"] = _file_sha256(self.dataset.class_map)
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


class SweepConfig(_Frozen):
    name: str = Field(default="sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    max_concurrency: int = Field(default=2, ge=1)
    base: RunConfig = RunConfig()
    runs: list[dict[str, Any]] = Field(min_length=1, description="overrides of `base`, one per run")

    def expand(self) -> list[RunConfig]:
        """The runs, each ``base`` deep-merged with its overrides and validated."""
        out = []
        for i, over in enumerate(self.runs):
            merged = _deep_merge(self.base.model_dump(), over)
            merged.setdefault("name", f"{self.name}-{i}")
            if merged["name"] == self.base.name:
                merged["name"] = f"{self.name}-{i}"
            try:
                out.append(RunConfig.model_validate(merged))
            except ValidationError as e:
                raise ConfigError(format_validation_error(e, f"runs[{i}]")) from None
        return out


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, val in b.items():
        out[key] = _deep_merge(out[key], val) if isinstance(val, dict) and isinstance(out.get(key), dict) else val
    return out


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The field names allowed at ``loc`` (a pydantic error location), for 'unknown key' messages."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        cur = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cur is None:
            return None
    return sorted(getattr(cur, "model_fields", {}))


def format_validation_error(err: ValidationError, prefix: str = "", model: type[BaseModel] = RunConfig) -> str:
    """One line per problem: the key's path, what was wrong, and the allowed keys or values."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {path}: unknown key{hint}")
        else:
            got = e.get("input")
            got_s = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"  {path}: {e['msg']} (got {got_s[:80]})")
    return "invalid configuration:\n" + "\n".join(lines)


def _read_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file not found: {str(path)!r}; pass the path of a YAML file (see configs/).")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level; got {type(data).__name__}.")
    return data


def load_config(path: str | Path | None = None, **overrides) -> RunConfig:
    """Read and validate a run config from YAML (``None``: the defaults), with keyword overrides on top."""
    data = _read_yaml(path) if path is not None else {}
    data = _deep_merge(data, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_sweep(path: str | Path) -> SweepConfig:
    data = _read_yaml(path)
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model=SweepConfig)) from None
    sweep.expand()  # validate every run now, before any compute
    return sweep
