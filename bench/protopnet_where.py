"""Where ProtoPNet's prototypes look, on one backbone and data seed: the share of its pushed patches and of its
test-image map peaks that lie on the feature map's border (against the border's share of the map's cells), the
spread of each prototype's peak over a class's test images, and how peaked its maps are. The measurement behind the
README's explanation of ProtoPNet's consistency (``bench/paper_table.py``).

    .venv/bin/python bench/protopnet_where.py --backbone vit --cache /tmp/pp/cache     # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_table import trunk_model  # noqa: E402
from phpn_core.data.base import normalize  # noqa: E402
from phpn_core.data.synthparts import SynthParts  # noqa: E402
from phpn_core.models.split import split_classifier  # noqa: E402
from phpn_core.protopnet import ProtoPNetConfig, train_protopnet  # noqa: E402
from phpn_core.protopnet.maps import own_class_maps  # noqa: E402


def on_border(y: torch.Tensor, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return (y == 0) | (y == h - 1) | (x == 0) | (x == w - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vit", choices=("cnn", "convnext", "vit"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None, help="trained trunk weights (bench/paper_table.py's cache)")
    args = ap.parse_args()
    train, test = SynthParts(split="train", seed=args.seed), SynthParts(split="test", seed=args.seed)
    model, _ = trunk_model(args.backbone, train, seed=args.seed, epochs=None, cache=args.cache)
    features, _, _ = split_classifier(model)
    res = train_protopnet(features, train, num_classes=len(train.classes), config=ProtoPNetConfig(), seed=args.seed,
                          progress=False)
    net = res.model.eval()
    xs = normalize(torch.stack([test[i]["image"] for i in range(len(test))]), test.mean, test.std)
    ys = torch.tensor(test.labels)
    h, w = res.push.feature_size
    cells = res.push.cell
    area = 1 - (h - 2) * (w - 2) / (h * w)
    pushed = float(on_border(cells[:, 0], cells[:, 1], h, w).float().mean())
    S = train[0]["image"].shape[-1]
    near = 0
    for j in range(len(cells)):  # a pushed patch "on a part": its cell's centre within 12 px of a visible keypoint
        kp = torch.as_tensor(train[int(res.push.image_index[j])]["keypoints"], dtype=torch.float32)
        cy, cx = (float(cells[j, 0]) + 0.5) * S / h, (float(cells[j, 1]) + 0.5) * S / w
        vis = kp[kp[:, 2] > 0.5]
        near += int(len(vis) > 0 and float(((vis[:, 0] - cx) ** 2 + (vis[:, 1] - cy) ** 2).sqrt().min()) <= 12)
    peaks, spread, contrast = [], [], []
    with torch.no_grad():
        for c in range(len(train.classes)):
            maps = own_class_maps(net, xs[ys == c], c).flatten(2)  # [n, m, h*w]
            p = maps.argmax(2)
            peaks.append(p.flatten())
            spread += [len(set(p[:, j].tolist())) / p.shape[0] for j in range(p.shape[1])]
            contrast.append((maps.max(2).values - maps.min(2).values).flatten())
    p = torch.cat(peaks)
    test_border = float(on_border(p // w, p % w, h, w).float().mean())
    print(f"{args.backbone} seed {args.seed}: map {h}x{w}, border cells {area:.2f} of the map")
    print(f"  pushed patches on the border: {pushed:.2f} of {len(cells)}")
    print(f"  test-image peaks on the border: {test_border:.2f}")
    print(f"  pushed patches within 12 px of a visible part keypoint: {near} of {len(cells)}")
    print(f"  distinct peak cells per prototype / images of its class (1 = a new cell on every image): "
          f"{sum(spread) / len(spread):.2f}")
    print(f"  map max - min (similarity), median: {float(torch.cat(contrast).median()):.3g}")


if __name__ == "__main__":
    main()
