"""Deployment entrypoints (composition only): flows whose parameters are plain JSON (a config path, an output
directory, an optional Ray address), so that Prefect deployments, schedules and the UI's "Run" form can call them.

Each loads and validates its config, checks the stores, connects to the Ray cluster (``ray_address``, else the
config's ``compute.ray_address``, else ``RAY_ADDRESS``, else a local Ray) and calls the existing flow
(:func:`flows.decompose.decompose_flow`, :func:`flows.sweep.sweep_flow`) as a subflow. Registered by
``infra/prefect.yaml``; relative paths are taken from the deployment's working directory (the repository).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from phpn_core.config import load_config, load_sweep


def _run_name(prefix: str):
    """``<prefix>-<config file stem>`` for the flow run (e.g. run-demo for configs/demo.yaml)."""

    def name() -> str:
        from prefect.runtime import flow_run

        return f"{prefix}-{Path(str(flow_run.parameters.get('config', 'config'))).stem}"

    return name


@flow(name="phpn-run-config", flow_run_name=_run_name("run"), log_prints=True)
def run_config(config: str, out_dir: str, ray_address: str | None = None) -> dict:
    """Decompose the classifier the YAML run config at ``config`` describes into ``out_dir``; returns the metrics."""
    from flows.decompose import decompose_flow
    from flows.preflight import preflight
    from flows.runtime import runtime

    cfg = load_config(config)
    preflight(cfg, out_dir)
    with runtime(ray_address=ray_address or cfg.compute.ray_address, num_cpus=cfg.compute.num_cpus):
        return decompose_flow(cfg, out_dir)


@flow(name="phpn-sweep-config", flow_run_name=_run_name("sweep"), log_prints=True)
def sweep_config(config: str, out_dir: str, ray_address: str | None = None) -> list[dict]:
    """Run the YAML sweep at ``config`` (every run under ``out_dir/<run name>``); returns the summary rows."""
    from flows.runtime import runtime
    from flows.sweep import sweep_flow

    sweep = load_sweep(config)
    with runtime(ray_address=ray_address or sweep.base.compute.ray_address, num_cpus=sweep.base.compute.num_cpus):
        return sweep_flow(sweep, out_dir)


@flow(name="phpn-decompose-store-run", flow_run_name="decompose-store-k{k}", log_prints=True)
def decompose_store(features_uri: str, head: str, k: int, out_dir: str, test_features_uri: str | None = None,
                    classes: list[int] | None = None, config: str | None = None,
                    ray_address: str | None = None) -> dict:
    """``phpn decompose`` as a deployment: decompose the linear head ``head`` (safetensors ``weight [C, D]``,
    ``bias [C]``) over the feature store ``features_uri`` into ``out_dir`` (``config``: optional YAML for the
    decompose/compute/storage sections; ``classes``: head rows). Returns the metrics."""
    from flows.decompose import decompose_store_flow
    from flows.preflight import check_store_reachable
    from flows.runtime import runtime

    cfg = load_config(config, decompose={"k": k, **({"classes": classes} if classes else {})})
    check_store_reachable(str(Path(out_dir).resolve()))
    with runtime(ray_address=ray_address or cfg.compute.ray_address, num_cpus=cfg.compute.num_cpus):
        return decompose_store_flow(cfg, features_uri, head, out_dir, test_features_uri)
