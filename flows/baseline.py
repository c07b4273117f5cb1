"""The ProtoPNet baseline flow (``phpn baseline protopnet``): the run's model (trained or loaded, as the decompose
flow prepares it), then ProtoPNet trained on its trunk, evaluated and published beside phpn's entries."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from phpn_core.config import RunConfig
from tasks.baseline import train_protopnet_baseline
from tasks.prepare import prepare_model


@flow(name="phpn-protopnet", flow_run_name="protopnet-{cfg.name}-{cfg.model.arch}-{cfg.dataset.kind}")
def protopnet_flow(cfg: RunConfig, out_dir: str) -> dict:
    """Train, evaluate and publish the ProtoPNet baseline of ``cfg`` into ``cfg.storage.registry_uri`` (default
    ``out_dir/registry``, the decompose flow's, so that ``phpn serve`` lists both). Returns its metrics."""
    from phpn_core.data.factory import RunDatasets

    t0 = time.perf_counter()
    datasets = RunDatasets(cfg.dataset)
    registry_uri = cfg.storage.registry_uri or str(Path(out_dir) / "registry")
    model_rec = prepare_model(cfg, out_dir, datasets)
    metrics = train_protopnet_baseline(cfg, model_rec, registry_uri, out_dir, datasets)
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    rows = "\n".join(f"| {k} | {metrics.get(k)} |" for k in ("accuracy", "accuracy_cnn", "consistency", "stability",
                                                                "prototypes_per_class", "train_seconds"))
    create_markdown_artifact(key="protopnet-baseline", description=f"ProtoPNet baseline {metrics['entry_id']}",
                             markdown=f"# ProtoPNet baseline `{metrics['entry_id']}`\n\n| metric | value |\n|---|---|\n"
                                      f"{rows}\n")
    return metrics
