"""Interpretability beyond post-ReLU CNNs: small ConvNeXt- and ViT-style models trained on SynthParts.

For each backbone and data seed: train the model on SynthParts (8 classes, 112 px; CPU, minutes), split it with
``split_classifier`` (its features are signed: LayerNormed maps / tokens), decompose with ``decompose_head`` for
each signed-feature discovery (``hybrid_nmf``, the default for signed features, ``posneg_nmf``, ``semi_nmf`` and
``shift_nmf``), and evaluate on the
test split with :func:`phpn_core.evaluation.suite.evaluate_all`: ProtoEval consistency and stability of phpn, of
its initial prototypes (plain semi-NMF / shifted NMF, before scaling and refinement) and of DFF (grad-cam's recipe:
per-channel minimum subtracted, sklearn NMF); accuracy of the model and of the decomposed head on the test split,
and the largest logit difference between them. This is the table in README "Backbones: quality".

    .venv/bin/python bench/backbone_quality.py                                   # both models, seeds 0-2
    .venv/bin/python bench/backbone_quality.py --models convnext --seeds 0

Models (both stride 8: a 14 x 14 map at 112 px, like the demo's CNN; both on the synthparts CNN's conv/BN/ReLU stem,
without which neither trained beyond chance on 400 images in 10-16 epochs on these cores):
- ``convnext``: torchvision ``ConvNeXt``: stem, two ConvNeXt blocks (depthwise 7x7, LayerNorm, inverted MLP, layer
  scale) at width 96; its head LayerNorm2d + Linear after the average pool (folded exactly into a per-image affine
  map by ``split_classifier``), so the map is signed.
- ``vit``: timm ``VisionTransformer`` (hybrid: the stem as ``HybridEmbed``, 196 tokens of width 96, two blocks of 4
  heads, no class token), ``global_pool="avg"`` with ``fc_norm`` (the LayerNorm of the pooled tokens, folded the same
  way); the tokens are signed.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phpn_core import PartPrototypeHead, decompose_head  # noqa: E402
from phpn_core.data.base import normalize  # noqa: E402
from phpn_core.data.synthparts import SynthParts  # noqa: E402
from phpn_core.evaluation.suite import evaluate_all  # noqa: E402
from phpn_core.models.split import split_classifier  # noqa: E402
from phpn_core.models.synthparts_cnn import train_classifier  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from consistency_seeds import class_features  # noqa: E402  (the same feature pass as the CNN table)


def _stem(width: int = 96) -> torch.nn.Sequential:
    """The synthparts CNN's conv/BN/ReLU stem at stride 8 ([B, 3, 112, 112] -> [B, width, 14, 14]): BatchNorm makes a
    model this small trainable on 400 images in seconds per epoch; the blocks above it are the backbone family's own."""
    from phpn_core.models.synthparts_cnn import _block

    stem = torch.nn.Sequential(
        *_block(3, width // 4, kernel=4, stride=4, padding=0),
        *_block(width // 4, width // 2, kernel=3, stride=2, padding=1),
        *_block(width // 2, width, kernel=3, stride=1, padding=1),
    )
    stem.num_features = width  # what timm's HybridEmbed reads
    return stem


def build(name: str, n_classes: int, seed: int) -> tuple[torch.nn.Module, dict]:
    """A fresh model (weights from ``seed``) and its training recipe."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "convnext":
            from torchvision.models import ConvNeXt
            from torchvision.models.convnext import CNBlock, CNBlockConfig

            model = ConvNeXt([CNBlockConfig(96, None, 2)], stochastic_depth_prob=0.0, num_classes=n_classes)
            model.features = torch.nn.Sequential(_stem(96), torch.nn.Sequential(CNBlock(96, 1e-6, 0.0),
                                                                                CNBlock(96, 1e-6, 0.0)))
            return model, {"epochs": 12, "lr": 4e-3}
        if name == "vit":
            from timm.layers import HybridEmbed
            from timm.models.vision_transformer import VisionTransformer

            def embed(**_):
                return HybridEmbed(backbone=_stem(96), img_size=112, patch_size=1, feature_size=14, in_chans=3,
                                   embed_dim=96)

            model = VisionTransformer(img_size=112, patch_size=1, embed_dim=96, depth=2, num_heads=4, mlp_ratio=2.0,
                                      num_classes=n_classes, global_pool="avg", class_token=False, fc_norm=True,
                                      embed_layer=embed)
            return model, {"epochs": 12, "lr": 2e-3}
    raise SystemExit(f"unknown model {name!r}: expected convnext or vit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="convnext,vit")
    ap.add_argument("--seeds", default="0,1,2", help="data seeds, comma-separated")
    ap.add_argument("--discoveries", default="hybrid_nmf,posneg_nmf,semi_nmf,shift_nmf")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--target", default="residual", choices=("residual", "prototype"),
                    help="refinement target (the demo uses prototype, the library default is residual)")
    ap.add_argument("--epochs", type=int, default=None, help="override the model's recipe")
    ap.add_argument("--ridge", type=float, default=1e-3, help="decompose refine_ridge")
    ap.add_argument("--normalization", default="l2", choices=("l2", "none"))
    ap.add_argument("--cache", default=None, help="directory for trained weights (reused when present)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{'model':8s} {'seed':>4s} {'discovery':10s} {'phpn cons':>9s} {'stab':>5s} {'init cons':>9s} {'stab':>5s} "
          f"{'dff cons':>8s} {'stab':>5s} {'acc':>6s} {'acc dec':>7s} {'max|dlogit|':>11s} {'s':>5s}")
    rows = []
    for name in args.models.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            t0 = time.perf_counter()
            train = SynthParts(split="train", seed=seed)
            test = SynthParts(split="test", seed=seed)
            model, recipe = build(name, len(train.classes), seed)
            if args.epochs:
                recipe["epochs"] = args.epochs
            cached = Path(args.cache) / f"{name}-seed{seed}-e{recipe['epochs']}.pt" if args.cache else None
            if cached is not None and cached.is_file():
                model.load_state_dict(torch.load(cached, weights_only=True))
            else:
                train_classifier(model, train, seed=seed, progress=False, description=f"train {name}", **recipe)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(model.state_dict(), cached)
            features, W, b = split_classifier(model.eval())
            feats = class_features(features, train)
            test_feats = class_features(features, test)
            with torch.inference_mode():
                xs = normalize(torch.stack([test[i]["image"] for i in range(len(test))]), test.mean, test.std)
                ref = model(xs)
            ys = torch.tensor(test.labels)
            acc = float((ref.argmax(1) == ys).float().mean())
            for disc in args.discoveries.split(","):
                dec = decompose_head(feats, W.float(), args.k, seed=0, discovery=disc, target=args.target,
                                     refine_ridge=args.ridge, normalization=args.normalization)
                head = PartPrototypeHead(dec.prototypes, b.float(), signs=torch.sign(dec.alpha))
                Ft = torch.cat([test_feats[c] for c in sorted(test_feats)]).permute(0, 3, 1, 2)
                yt = torch.cat([torch.full((len(test_feats[c]),), c) for c in sorted(test_feats)])
                with torch.inference_mode():
                    logits = head(Ft)
                order = torch.cat([torch.nonzero(ys == c).squeeze(1) for c in sorted(test_feats)])
                dlogit = float((logits - ref[order]).abs().max())
                acc_dec = float((logits.argmax(1) == yt).float().mean())
                s = evaluate_all(features, head, test, initial=dec.initial, train_dataset=train)["summary"]
                ini, dff = s["baselines"]["plain_nmf"], s["baselines"]["dff"]
                row = (name, seed, disc, s["consistency"], s["stability"], ini["consistency"], ini["stability"],
                       dff["consistency"], dff["stability"], acc, acc_dec, dlogit)
                rows.append(row)
                print(f"{name:8s} {seed:4d} {disc:10s} {row[3]:9.1f} {row[4]:5.1f} {row[5]:9.1f} {row[6]:5.1f} "
                      f"{row[7]:8.1f} {row[8]:5.1f} {acc:6.4f} {acc_dec:7.4f} {dlogit:11.2e} "
                      f"{time.perf_counter() - t0:5.0f}", flush=True)
    print("\nmeans over seeds (consistency / stability):")
    for name in args.models.split(","):
        for disc in args.discoveries.split(","):
            sel = [r for r in rows if r[0] == name and r[2] == disc]
            if sel:
                m = [sum(r[i] for r in sel) / len(sel) for i in range(3, 9)]
                print(f"{name:8s} {disc:10s} phpn {m[0]:5.1f} / {m[1]:5.1f}   initial {m[2]:5.1f} / {m[3]:5.1f}   "
                      f"dff {m[4]:5.1f} / {m[5]:5.1f}   min acc {min(r[9] for r in sel):.4f}")


if __name__ == "__main__":
    main()
