"""sweep_flow: many (model, dataset, k) runs as subflows with bounded concurrency, one summary table."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from phpn_core.config import SweepConfig

from .decompose import decompose_flow

SUMMARY_KEYS = ("name", "entry_id", "accuracy_original", "accuracy_decomposed", "max_abs_logit_diff",
                "consistency", "stability", "k", "n_classes", "seconds")


@flow(name="phpn-sweep", flow_run_name="sweep-{sweep.name}", log_prints=True)
def sweep_flow(sweep: SweepConfig, out_dir: str) -> list[dict]:
    """Run every configuration of the sweep (at most ``max_concurrency`` at once) under ``out_dir/<run name>``."""
    log = get_run_logger()
    runs = sweep.expand()

    def one(cfg):
        try:
            m = decompose_flow(cfg, str(Path(out_dir) / cfg.name))
            return {"name": cfg.name, "status": "ok", **{k: m.get(k) for k in SUMMARY_KEYS if k != "name"}}
        except Exception as e:  # one failed run must not lose the others' results
            log.error("run %s failed: %s", cfg.name, e)
            return {"name": cfg.name, "status": f"failed: {type(e).__name__}: {e}"[:200]}

    with ThreadPoolExecutor(max_workers=sweep.max_concurrency) as ex:
        rows = list(ex.map(one, runs))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "sweep.json").write_text(json.dumps(rows, indent=2))
    create_table_artifact(rows, key=f"phpn-sweep-{sweep.name}".lower().replace("_", "-"),
                          description=f"Sweep {sweep.name}: {len(rows)} runs")
    return rows
