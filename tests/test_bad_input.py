"""Bad input is refused before any compute, with a message that says what is wrong and where (issue 7).

One table: each case builds its bad input, sends it through a public entry point (the ``phpn`` CLI through
typer's CliRunner where that is cheap, else the library call the flow makes: ``tasks.prepare.check_inputs``, which
``decompose_flow`` runs in the driver before its first task, or the task body itself) and checks the exception type
or exit code and the message content. Plus a hypothesis fuzz of the config loader: random mutations of a valid
config give either a valid RunConfig or a ConfigError naming the key path, never another exception type.

Cases already covered deeper elsewhere (not repeated here): decompose_class/head argument checks
(test_decompose), registry id/argument checks (test_registry), URI parsing (test_uri), store write checks
(test_feature_store), image decoding details (test_datasets), checkpoint loading details (test_spec).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phpn_core.config import RunConfig, load_config
from phpn_core.errors import ConfigError, PhpnError

DATASET = {"n_classes": 3, "train_per_class": 4, "test_per_class": 2, "image_size": 64}


def _flat(text: str) -> str:
    """Rich wraps long lines in the CLI's output: compare with whitespace collapsed."""
    return " ".join(text.split())


def _cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from flows.cli import app

    r = CliRunner().invoke(app, list(args))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a traceback instead of a message is a failure of its own
    return r.exit_code, _flat(r.output)


def _cfg(**over) -> RunConfig:
    base = {"name": "bad", "dataset": DATASET, "decompose": {"k": 3},
            "evaluate": {"enabled": False, "report": False}}
    for key, val in over.items():
        base[key] = {**base[key], **val} if isinstance(base.get(key), dict) and isinstance(val, dict) else val
    return load_config(None, **base)


def _synthparts_checkpoint(path: Path, n_classes: int = 3, *, seed: int = 0, nan: bool = False) -> str:
    from phpn_core.models.synthparts_cnn import SynthPartsCNN, save_model

    torch.manual_seed(seed)
    model = SynthPartsCNN(n_classes)
    if nan:
        with torch.no_grad():
            next(model.parameters())[0].fill_(float("nan"))
    save_model(model, path)
    return str(path)


def _image_tree(root: Path, files: dict[str, Callable[[Path], None]], per_class: int = 2) -> str:
    """An ImageFolder dataset ``root/{train,test}/{a,b}/`` of small RGB PNGs, plus ``files`` (relative name ->
    writer) for the bad ones."""
    from PIL import Image

    for split in ("train", "test"):
        for c, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (40, 40), colour).save(d / f"{i}.png")
    for rel, write in files.items():
        write(root / rel)
    return str(root)


def _truncated(p: Path) -> None:
    from PIL import Image

    Image.effect_noise((64, 64), 40).convert("RGB").save(p, "JPEG")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _corrupt(p: Path) -> None:
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


def _huge(p: Path) -> None:
    from PIL import Image

    Image.new("1", (9500, 9500)).save(p)  # 90 Mpx (a few KB on disk): over the 89.5 Mpx decompression-bomb limit


def _grayscale(p: Path) -> None:
    from PIL import Image

    Image.new("L", (40, 40), 128).save(p)


@dataclass
class Case:
    name: str
    run: Callable[[Path], Any]  # raises, or returns (exit_code, output) for CLI cases
    error: type[BaseException] | int | None  # exception type, CLI exit code, or None: must be accepted
    patterns: tuple[str, ...] = ()


def _check(make_cfg: Callable[[Path], RunConfig]):
    from tasks.prepare import check_inputs

    return lambda tmp: check_inputs(make_cfg(tmp))


def _imagefolder(bad: dict[str, Callable[[Path], None]]):
    return _check(lambda tmp: _cfg(dataset={"kind": "imagefolder", "root": _image_tree(tmp / "data", bad),
                                            "image_size": 32}, decompose={"k": 2}))


def _run_yaml(text: str):
    def run(tmp: Path):
        cfg = tmp / "c.yaml"
        cfg.write_text(text)
        code, out = _cli("run", str(cfg), "--out", str(tmp / "out"))
        assert not (tmp / "out").exists(), "refused configs must not create the run directory"
        return code, out

    return run


def _store_of_another_model(tmp: Path):
    from tasks.prepare import extract_split, prepare_model

    cfg = _cfg(model={"checkpoint": _synthparts_checkpoint(tmp / "a.safetensors", seed=0)})
    other = _cfg(model={"checkpoint": _synthparts_checkpoint(tmp / "b.safetensors", seed=1)})
    uri = str(tmp / "features" / "train.zarr")
    extract_split.fn(cfg, prepare_model.fn(cfg, str(tmp)), "train", uri)
    extract_split.fn(other, prepare_model.fn(other, str(tmp)), "train", uri)


def _nan_features(tmp: Path):
    from phpn_core.extract import extract_features
    from phpn_core.data.factory import build_dataset

    class NaNFeatures(torch.nn.Module):
        def forward(self, x):
            out = torch.relu(x[:, :, ::8, ::8]).repeat(1, 4, 1, 1)
            out[0, 0, 0, 0] = float("nan")
            return out

    extract_features(NaNFeatures(), build_dataset(_cfg().dataset, "train"), str(tmp / "nan.zarr"), model="nan",
                     checkpoint_digest="none", split="train", input_size=64, dataset_name="synthparts",
                     progress=False)


def _nan_in_decomposition(tmp: Path):
    from phpn_core import decompose_head

    F = torch.rand(2, 3, 3, 8)
    F[1, 0, 0, 0] = float("nan")
    decompose_head({0: torch.rand(2, 3, 3, 8), 2: F}, torch.randn(3, 8), 2)


def _registry_call(entry_id: str):
    def run(tmp: Path):
        from phpn_core.storage.registry import PrototypeRegistry

        PrototypeRegistry(tmp / "registry").load(entry_id)

    return run


CASES = [
    # -- configuration, through `phpn run CONFIG` ------------------------------------------------------------------
    Case("config: unknown top-level key", _run_yaml("name: x\nunknwn_section: {a: 1}\n"), 2,
         (r"unknwn_section: unknown key", r"allowed keys here: .*dataset.*decompose")),
    Case("config: unknown nested key", _run_yaml("decompose: {kk: 3}\n"), 2,
         (r"decompose\.kk: unknown key; allowed keys here: .*\bk\b",)),
    Case("config: ill-typed value", _run_yaml("compute: {classes_per_task: many}\n"), 2,
         (r"compute\.classes_per_task", r"valid integer", r"'many'")),
    Case("config: section of the wrong type", _run_yaml("dataset: [1, 2]\n"), 2, (r"dataset:", r"\[1, 2\]")),
    Case("config: out-of-range value", _run_yaml("decompose: {k: 0}\n"), 2, (r"decompose\.k", r"greater than or equal to 1")),
    Case("config: not a mapping", _run_yaml("- just\n- a list\n"), 2, (r"expected a mapping", r"got list")),
    Case("config: s3 URI without a bucket", _run_yaml("storage: {registry_uri: 's3:///reg'}\n"), 2,
         (r"storage\.registry_uri", r"S3 URI has no bucket", r"Fix: put the bucket name")),
    Case("config: missing checkpoint file", _run_yaml("model: {arch: resnet18, checkpoint: /nonexistent/x.pt}\n"),
         2, (r"model", r"no file at '/nonexistent/x\.pt'")),
    # -- registry and URIs, through `phpn registry` ----------------------------------------------------------------
    Case("registry: entry id with ../", lambda tmp: _cli("registry", "show", str(tmp), "../../etc/passwd"), 2,
         (r"Unsafe name '\.\./\.\./etc/passwd'", r"'\.\.' path component", r"Fix:")),
    Case("registry: absolute entry id", lambda tmp: _cli("registry", "show", str(tmp), "/etc/passwd"), 2,
         (r"absolute path",)),
    Case("registry: s3 URI without a bucket", lambda tmp: _cli("registry", "list", "s3://"), 2,
         (r"S3 URI has no bucket", r"got 's3://'")),
    Case("registry: entry id with ../ (library)", _registry_call("a/../../b"), PhpnError, (r"'\.\.' path component",)),
    # -- model checkpoint, through check_inputs (the flow's first step) ----------------------------------------------
    Case("checkpoint of another architecture",
         _check(lambda tmp: _cfg(model={"arch": "resnet18",
                                        "checkpoint": _synthparts_checkpoint(tmp / "sp.safetensors")})),
         PhpnError, (r"does not fit resnet18", r"missing keys \(conv1\.weight", r"unexpected keys \(features\.",
                     r"another architecture", r"sp\.safetensors")),
    Case("checkpoint with another class count",
         _check(lambda tmp: _cfg(model={"checkpoint": _synthparts_checkpoint(tmp / "c5.safetensors", 5)})),
         PhpnError, (r"SynthPartsCNN with 5 classes", r"num_classes=3", r"c5\.safetensors")),
    Case("checkpoint with NaN weights",
         _check(lambda tmp: _cfg(model={"checkpoint": _synthparts_checkpoint(tmp / "n.safetensors", nan=True)})),
         PhpnError, (r"NaN/inf in 1 tensors \(features\.0\.weight\)", r"n\.safetensors")),
    Case("truncated checkpoint",
         _check(lambda tmp: _cfg(model={"checkpoint": _truncate(_synthparts_checkpoint(tmp / "t.safetensors"))})),
         PhpnError, (r"t\.safetensors", r"truncated")),
    # -- images ------------------------------------------------------------------------------------------------------
    Case("truncated image", _imagefolder({"train/a/trunc.jpg": _truncated}), PhpnError,
         (r"1 of \d+ images", r"train/a/trunc\.jpg", r"truncated|broken|decode", r"on_error: skip")),
    Case("corrupt image", _imagefolder({"test/b/junk.png": _corrupt}), PhpnError,
         (r"test/b/junk\.png", r"could not decode")),
    Case("huge image (decompression bomb)", _imagefolder({"train/b/bomb.png": _huge}), PhpnError,
         (r"train/b/bomb\.png", r"9500x9500 = 90250000 pixels", r"over the limit")),
    Case("grayscale image is converted, not refused", _imagefolder({"train/a/gray.png": _grayscale}), None),
    # -- classes and features ----------------------------------------------------------------------------------------
    Case("class with fewer images than k allows",
         _check(lambda tmp: _cfg(dataset={"train_per_class": 1}, decompose={"k": 20})), PhpnError,
         (r"3 classes have too few training images for decompose\.k=20", r"4x4 = 16 feature rows",
          r"at least 2 images", r"class 0 \(.*\): 1 images", r"lower decompose\.k to at most 16")),
    Case("k above the feature channels", _check(lambda tmp: _cfg(decompose={"k": 200})), PhpnError,
         (r"decompose\.k=200 is larger than the model's 128 feature channels",)),
    Case("NaN features from the backbone", _nan_features, PhpnError,
         (r"features for chunk \d+ are not finite", r"1 NaN/inf values", r"check the backbone")),
    Case("NaN features handed to the decomposition", _nan_in_decomposition, ValueError,
         (r"class 2: features contain NaN or inf",)),
    Case("feature store from another model", _store_of_another_model, PhpnError,
         (r"train\.zarr", r"checkpoint_digest", r"fingerprint")),
]


def _truncate(path: str) -> str:
    p = Path(path)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_with_what_and_where(case: Case, tmp_path):
    if isinstance(case.error, int):
        code, message = case.run(tmp_path)
        assert code == case.error, message
    elif case.error is None:
        case.run(tmp_path)
        return
    else:
        with pytest.raises(case.error) as ei:
            case.run(tmp_path)
        message = _flat(str(ei.value))
        assert not isinstance(ei.value, AssertionError)
    for pat in case.patterns:
        assert re.search(pat, message), f"{pat!r} not in: {message}"
    assert "Traceback" not in message


def test_check_inputs_runs_before_any_compute_in_the_flow(phpn_runtime, tmp_path):
    """The flow refuses a bad checkpoint before its first task: nothing is trained, extracted or staged."""
    from flows.decompose import decompose_flow
    from phpn_core.models.spec import CheckpointError

    cfg = _cfg(model={"arch": "resnet18", "checkpoint": _synthparts_checkpoint(tmp_path / "sp.safetensors")})
    with pytest.raises(CheckpointError, match="does not fit resnet18"):
        decompose_flow(cfg, str(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


# ------------------------------------------------------------------------------------------------------------------
# Fuzzing the config loader


def _paths(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out.extend(_paths(v, (*prefix, k)))
    return out


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                       max_leaves=6)
_EXTREMES = [float("nan"), float("inf"), float("-inf"), -1, 0, 10**18, -(10**18), 1e308, "", " ", True, [], {},
             "s3://", "../x", "\x00"]
_keys = st.one_of(st.text(min_size=1, max_size=12), st.integers(-5, 5))


@st.composite
def _mutated(draw):
    """A valid config dump with 1-3 mutations: (kind, path) of each, and the mutated dict."""
    base = RunConfig().model_dump(mode="json")
    muts = []
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(base)
        path = draw(st.sampled_from(paths))
        parent = base
        for p in path[:-1]:
            parent = parent[p]
        if not isinstance(parent, dict) or path[-1] not in parent:
            continue
        kind = draw(st.sampled_from(["retype", "extreme", "unknown", "delete", "rename"]))
        if kind == "retype":
            parent[path[-1]] = draw(_values)
        elif kind == "extreme":
            parent[path[-1]] = draw(st.sampled_from(_EXTREMES))
        elif kind == "unknown":
            key = draw(_keys)
            if key in parent:
                continue
            parent[key] = draw(_values)
            path = (*path[:-1], key)
        elif kind == "delete":
            del parent[path[-1]]
        else:
            key = draw(st.text(min_size=1, max_size=12))
            if key in parent:
                continue
            parent[key] = parent.pop(path[-1])
            path = (*path[:-1], key)
        muts.append((kind, path))
    return muts, base


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_config_loader_fuzz_gives_a_config_or_a_config_error_naming_the_key(mutated):
    """Through the YAML file the CLI reads (so non-string keys and YAML's own types are covered too)."""
    import tempfile

    muts, data = mutated
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(yaml.safe_dump(data))
        try:
            cfg = load_config(path)
        except ConfigError as e:
            msg = str(e)
            assert msg.startswith("invalid configuration:") and len(msg.splitlines()) >= 2, msg
            named = [p for kind, p in muts if kind != "delete"]
            # Some mutated key is named by its dotted path, or by its section and its name (cross-field checks).
            assert any(".".join(map(str, p)) in msg or (len(p) > 1 and ".".join(map(str, p[:-1])) in msg
                                                        and str(p[-1]) in msg) for p in named), (muts, msg)
            return
        except Exception as e:  # the failure this test looks for
            raise AssertionError(f"{type(e).__name__} escaped load_config for mutations {muts}: {e}") from e
    assert isinstance(cfg, RunConfig)
    # A config that loads is sane: finite numbers, and it survives a YAML round trip unchanged.
    dump = cfg.model_dump()
    for p in _paths(dump):
        v = dump
        for part in p:
            v = v[part]
        if isinstance(v, float):
            assert v == v and abs(v) != float("inf"), (p, v)
    assert load_config(None, **yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))) == cfg
