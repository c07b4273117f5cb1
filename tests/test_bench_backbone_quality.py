"""bench/backbone_quality.py, in miniature: a ConvNeXt and a ViT with signed maps are trained on SynthParts (one
epoch each), split, decomposed with the signed-feature default and evaluated; the decomposed head is exact.

The full table (12 epochs, seeds 0-2, every discovery) is the benchmark; this keeps the script from rotting and
checks exactness on trained (not random) signed backbones."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_backbone_quality_script_runs_and_the_decomposed_heads_are_exact(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "backbone_quality.py"), "--models", "convnext,vit", "--seeds", "0",
         "--epochs", "1", "--discoveries", "auto", "--cache", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if re.match(r"^(convnext|vit)\s+0\s+auto\s", line)]
    assert [r[0] for r in rows] == ["convnext", "vit"], out.stdout
    for r in rows:
        phpn, init, dff = float(r[3]), float(r[5]), float(r[7])
        acc, acc_dec, dlogit = float(r[9]), float(r[10]), float(r[11])
        assert all(0.0 <= x <= 100.0 for x in (phpn, init, dff))
        assert acc == acc_dec, f"{r[0]}: the decomposed head's accuracy differs from the model's"
        assert dlogit <= 1e-4, f"{r[0]}: max |logit difference| {dlogit}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convnext-seed0-e1.pt", "vit-seed0-e1.pt"]
    assert "means over seeds" in out.stdout
