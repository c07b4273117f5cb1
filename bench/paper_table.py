"""The paper's table in miniature: post-hoc phpn vs an ante-hoc ProtoPNet on the same trunk, data and ProtoEval code.

For each data seed: SynthParts (8 classes, 112 px; train/test splits of that seed), the trunk model trained on it
(``--backbone cnn``: the synthparts CNN at stride 8, as ``bench/consistency_seeds.py``; ``convnext``/``vit``: the
small signed-feature models of ``bench/backbone_quality.py``, built by its ``build``), then

- **phpn**: ``decompose_head`` with the library's defaults (k prototypes per class) + ``PartPrototypeHead``, evaluated by
  :func:`phpn_core.evaluation.suite.evaluate_all`, which also gives **plain_nmf** (the discovered prototypes before
  scaling and refinement) and **dff** (Deep Feature Factorization concepts); their accuracy is the trunk model's (the
  decomposed head's logits are checked against the model's: ``max |logit diff|``);
- **protopnet**: :func:`phpn_core.protopnet.train_protopnet` on a copy of the same trained trunk (the features of
  ``split_classifier``), evaluated by :func:`phpn_core.protopnet.protopnet_protoeval`, i.e. the same
  ``protoeval_maps`` loop with the same box / threshold / noise settings, and its accuracy on the same test split.

Columns: ``method | accuracy | consistency | stability | prototypes per class | seconds`` (the trunk's training,
phpn's feature pass + decomposition, plain NMF's and DFF's factorisation alone, ProtoPNet's training). Printed per
seed and as a mean over the seeds. Nothing is tuned on the test split.

    .venv/bin/python bench/paper_table.py                       # cnn, seeds 0,1,2
    .venv/bin/python bench/paper_table.py --quick               # one seed, a shorter ProtoPNet schedule
    .venv/bin/python bench/paper_table.py --backbone convnext --cache /tmp/qcache --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phpn_core import PartPrototypeHead, decompose_head  # noqa: E402
from phpn_core.data.base import normalize  # noqa: E402
from phpn_core.data.synthparts import SynthParts  # noqa: E402
from phpn_core.evaluation.baselines import dff_concepts  # noqa: E402
from phpn_core.evaluation.suite import evaluate_all  # noqa: E402
from phpn_core.models.split import split_classifier  # noqa: E402
from phpn_core.models.synthparts_cnn import SynthPartsCNN, train_classifier  # noqa: E402
from phpn_core.protopnet import ProtoPNetConfig, protopnet_accuracy, protopnet_protoeval, train_protopnet  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbone_quality import build  # noqa: E402  (the small ConvNeXt / ViT of the quality bench)
from consistency_seeds import class_features  # noqa: E402  (the same feature pass as the other tables)

METHODS = ("cnn", "phpn", "plain_nmf", "dff", "protopnet")
PROTOEVAL = dict(box_half_size=36, threshold=0.8, noise_std=0.2, noise_clip=0.25, seed=0)  # evaluate_all's defaults


def trunk_model(name: str, train, *, seed: int, epochs: int | None, cache: Path | None):
    """The trained trunk model (eval mode) and the seconds its training took (read back from the cache's record)."""
    n_classes = len(train.classes)
    if name == "cnn":
        with torch.random.fork_rng(devices=[]):  # train_synthparts_cnn's initialisation, without its training call
            torch.manual_seed(seed)
            model = SynthPartsCNN(n_classes, stride=8)
        recipe = {"epochs": 12, "lr": 4e-3}
    else:
        model, recipe = build(name, n_classes, seed)
    if epochs:
        recipe["epochs"] = epochs
    stem = f"{name}-seed{seed}-e{recipe['epochs']}" if name != "cnn" else f"cnn-stride8-seed{seed}-e{recipe['epochs']}"
    path = cache / f"{stem}.pt" if cache else None
    if path is not None and path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        meta = path.with_suffix(".json")
        seconds = json.loads(meta.read_text())["seconds"] if meta.is_file() else float("nan")
        return model.eval(), seconds
    t0 = time.perf_counter()
    train_classifier(model, train, seed=seed, progress=False, description=f"train {name}", **recipe)
    seconds = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        path.with_suffix(".json").write_text(json.dumps({"seconds": seconds}))
    return model.eval(), seconds


def state_copy(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def run_seed(args, seed: int, config: ProtoPNetConfig) -> dict:
    train, test = SynthParts(split="train", seed=seed), SynthParts(split="test", seed=seed)
    model, train_s = trunk_model(args.backbone, train, seed=seed, epochs=args.trunk_epochs, cache=args.cache)
    features, W, b = split_classifier(model)
    xs = normalize(torch.stack([test[i]["image"] for i in range(len(test))]), test.mean, test.std)
    ys = torch.tensor(test.labels)
    with torch.inference_mode():
        ref = model(xs)
    acc = float((ref.argmax(1) == ys).float().mean())
    rows = {"cnn": {"accuracy": acc, "consistency": None, "stability": None, "prototypes_per_class": None,
                    "seconds": train_s}}

    # phpn with the library defaults
    t0 = time.perf_counter()
    feats = class_features(features, train)
    dec = decompose_head(feats, W.float(), args.k, seed=0)
    head = PartPrototypeHead(dec.prototypes, b.float(), signs=torch.sign(dec.alpha))
    dec_s = time.perf_counter() - t0
    test_feats = class_features(features, test)
    Ft = torch.cat([test_feats[c] for c in sorted(test_feats)]).permute(0, 3, 1, 2)
    order = torch.cat([torch.nonzero(ys == c).squeeze(1) for c in sorted(test_feats)])
    with torch.inference_mode():
        logits = head(Ft)
    dlogit = float((logits - ref[order]).abs().max())
    acc_dec = float((logits.argmax(1) == ys[order]).float().mean())
    summary = evaluate_all(features, head, test, initial=dec.initial, train_dataset=train, **PROTOEVAL)["summary"]
    # plain NMF's and DFF's own factorisation time (evaluate_all does not time them): the same calls again
    t0 = time.perf_counter()
    decompose_head(feats, W.float(), args.k, seed=0, refine_iter=1)
    nmf_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dff_concepts(features, train, k=args.k, seed=PROTOEVAL["seed"])
    dff_s = time.perf_counter() - t0
    rows["phpn"] = {"accuracy": acc_dec, "consistency": summary["consistency"], "stability": summary["stability"],
                    "prototypes_per_class": args.k, "seconds": dec_s, "max_abs_logit_diff": dlogit}
    for name, s in (("plain_nmf", nmf_s), ("dff", dff_s)):
        base = summary["baselines"][name]
        rows[name] = {"accuracy": acc, "consistency": base["consistency"], "stability": base["stability"],
                      "prototypes_per_class": args.k, "seconds": s}

    # ProtoPNet on a copy of the same trained trunk
    before = state_copy(model)
    res = train_protopnet(features, train, num_classes=len(train.classes), config=config, seed=seed,
                          progress=args.progress, device=args.device)
    if any(not torch.equal(v, before[k]) for k, v in model.state_dict().items()):
        raise SystemExit("train_protopnet changed the caller's trunk: it must train a copy")
    pe = protopnet_protoeval(res.model, test, **PROTOEVAL)
    rows["protopnet"] = {"accuracy": protopnet_accuracy(res.model, test), "consistency": pe.consistency,
                         "stability": pe.stability, "prototypes_per_class": config.prototypes_per_class,
                         "seconds": res.seconds, "phase_seconds": res.phase_seconds,
                         "train_accuracy_last_epoch": {ph: (h[-1]["accuracy"] if h else None)
                                                       for ph, h in res.history.items()}}
    return rows


def fmt(v, spec: str) -> str:
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return "-".rjust(width) if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_table(title: str, rows: dict) -> None:
    print(title)
    print(f"  {'method':10s} | {'accuracy':>8s} | {'consistency':>11s} | {'stability':>9s} | {'protos/class':>12s} | "
          f"{'seconds':>8s}")
    for m in METHODS:
        r = rows[m]
        print(f"  {m:10s} | {fmt(r['accuracy'], '8.4f')} | {fmt(r['consistency'], '11.1f')} | "
              f"{fmt(r['stability'], '9.1f')} | {fmt(r['prototypes_per_class'], '12d')} | {fmt(r['seconds'], '8.1f')}")


def mean(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="cnn", choices=("cnn", "convnext", "vit"))
    ap.add_argument("--seeds", default=None, help="data seeds, comma-separated (default 0,1,2; --quick: 0)")
    ap.add_argument("--quick", action="store_true", help="one seed and a shorter ProtoPNet schedule (minutes)")
    ap.add_argument("--k", type=int, default=3, help="phpn's prototypes per class")
    ap.add_argument("--trunk-epochs", "--epochs", dest="trunk_epochs", type=int, default=None,
                    help="the trunk model's training epochs (default: its recipe, 12)")
    ap.add_argument("--prototypes-per-class", type=int, default=None, help="ProtoPNet's m (default 10, official)")
    ap.add_argument("--warm-epochs", type=int, default=None)
    ap.add_argument("--joint-epochs", type=int, default=None)
    ap.add_argument("--last-layer-epochs", type=int, default=None)
    ap.add_argument("--cache", type=Path, default=None, help="directory for trained trunk weights (reused)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on shared cores OpenMP spin-waiting makes 2 threads slower)")
    ap.add_argument("--progress", action="store_true", help="ProtoPNet's progress bar")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object of the means and per-seed rows")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    overrides = {"warm_epochs": 3, "joint_epochs": 10, "joint_lr_step_size": 5} if args.quick else {}
    for key in ("prototypes_per_class", "warm_epochs", "joint_epochs", "last_layer_epochs"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    config = ProtoPNetConfig(**overrides)
    print(f"backbone {args.backbone}, seeds {seeds}, phpn k={args.k}, ProtoPNet "
          f"{json.dumps({k: v for k, v in dataclasses.asdict(config).items()})}", flush=True)
    t_all = time.perf_counter()
    per_seed = []
    for seed in seeds:
        t0 = time.perf_counter()
        rows = run_seed(args, seed, config)
        per_seed.append(rows)
        same = rows["phpn"]["accuracy"] == rows["cnn"]["accuracy"]
        print_table(f"\nseed {seed} ({time.perf_counter() - t0:.0f} s): phpn accuracy == {args.backbone} accuracy: "
                    f"{'yes' if same else 'NO'}; max |logit diff| {rows['phpn']['max_abs_logit_diff']:.2e}", rows)
        if not same:
            print("  WARNING: the decomposed head's accuracy differs from the model's")
    means = {m: {key: mean([r[m][key] for r in per_seed]) for key in ("accuracy", "consistency", "stability",
                                                                        "seconds")} for m in METHODS}
    for m in METHODS:
        means[m]["prototypes_per_class"] = per_seed[0][m]["prototypes_per_class"]
    print_table(f"\nmean over seeds {seeds}:", means)
    ratio = means["protopnet"]["accuracy"] / means["cnn"]["accuracy"]
    print(f"\nProtoPNet accuracy / {args.backbone} accuracy: {ratio:.3f} (floor 0.90: "
          f"{'met' if ratio >= 0.9 else 'NOT met'}); per seed "
          f"{[round(r['protopnet']['accuracy'] / r['cnn']['accuracy'], 3) for r in per_seed]}")
    for key in ("consistency", "stability"):
        wins = ["yes" if r["phpn"][key] > r["protopnet"][key] else "no" for r in per_seed]
        print(f"phpn beats ProtoPNet on {key}: per seed {wins}; mean {fmt(means['phpn'][key], '.1f')} vs "
              f"{fmt(means['protopnet'][key], '.1f')}")
    print(f"total {time.perf_counter() - t_all:.0f} s", flush=True)
    if args.json:
        out = {m: {**means[m], "per_seed": [{"seed": s, **r[m]} for s, r in zip(seeds, per_seed)]} for m in METHODS}
        print(json.dumps(out))


if __name__ == "__main__":
    main()
