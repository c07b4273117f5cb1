"""The `phpn` command line: demo, run, sweep, decompose, baseline, explain, registry, serve, cluster."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from flows.runtime import quiet_environment

app = typer.Typer(help="phpn: post-hoc part-prototype networks at cluster scale.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
registry_app = typer.Typer(help="Inspect a prototype registry.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
baseline_app = typer.Typer(help="Train a baseline on the run's trunk and data; publish it beside phpn's entries.",
                           no_args_is_help=True)
app.add_typer(baseline_app, name="baseline")
cluster_app = typer.Typer(help="A local cluster: Prefect server + worker, two Ray nodes (see infra/).",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
console = Console(stderr=True)


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(2)


def _run(cfg, out: Path, ray_address: Optional[str]) -> dict:
    quiet_environment()
    from flows.decompose import decompose_flow
    from flows.preflight import preflight
    from flows.runtime import runtime

    preflight(cfg, out)

    with runtime(ray_address=ray_address or cfg.compute.ray_address, num_cpus=cfg.compute.num_cpus) as rt:
        console.print(f"Prefect API: {rt.api_url} ({'temporary server' if rt.started_server else 'configured'}); "
                      f"Ray: {rt.ray_address or 'local'}")
        return decompose_flow(cfg, str(out))


def _summary(metrics: dict, out: Path, t0: float) -> None:
    table = Table(title="phpn run")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ("accuracy_original", "accuracy_decomposed", "max_abs_logit_diff", "max_head_reconstruction_error",
              "consistency", "stability", "n_classes", "k", "classes_computed", "classes_reused", "seconds"):
        v = metrics.get(k)
        table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    rows, names = metrics.get("decomposed_classes"), metrics.get("decomposed_class_names")
    if isinstance(rows, list) and isinstance(names, list) and len(rows) == len(names):
        shown = ", ".join(f"{r} {n}" for r, n in zip(rows[:8], names[:8])) + (" ..." if len(rows) > 8 else "")
        table.add_row("decomposed_classes", f"{len(rows)}: {shown}")
    Console().print(table)
    console.print(f"metrics: {out / 'metrics.json'}")
    if metrics.get("report"):
        console.print(f"report:  {metrics['report']}")
    console.print(f"wall time {time.perf_counter() - t0:.1f} s")


def _run_and_summarise(make_config, out: Path, ray_address: Optional[str]) -> None:
    """Build the config (``make_config(load_config)``), run it, print the summary; phpn errors exit 2."""
    from phpn_core.config import load_config
    from phpn_core.errors import PhpnError

    t0 = time.perf_counter()
    try:
        metrics = _run(make_config(load_config), out, ray_address)
    except PhpnError as e:
        _fail(str(e))
    _summary(metrics, out, t0)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="run directory (features/, registry/, report.html)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS", help="Ray cluster"),
    k: int = typer.Option(3, "--k", min=1, help="prototypes per class"),
) -> None:
    """Synthparts end to end: train the CNN, extract, decompose through Ray, publish, evaluate, report."""
    _run_and_summarise(lambda load: load(None, name="demo", model={"train_epochs": 12},
                                            decompose={"k": k, "target": "prototype"}),
                       out, ray_address)


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML run configuration (see configs/)"),
    out: Path = typer.Option(..., "--out", help="run directory"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS", help="Ray cluster"),
) -> None:
    """Decompose the classifier a YAML config describes (validated before any compute starts)."""
    _run_and_summarise(lambda load: load(config), out, ray_address)


@app.command()
def sweep(
    config: Path = typer.Argument(..., help="YAML sweep configuration"),
    out: Path = typer.Option(Path("runs/sweep"), "--out", help="directory for the runs"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS"),
) -> None:
    """Run many (model, dataset, k) configurations as subflows; print one summary table."""
    from phpn_core.config import load_sweep
    from phpn_core.errors import PhpnError

    try:
        sw = load_sweep(config)
    except PhpnError as e:
        _fail(str(e))
    quiet_environment()
    from flows.runtime import runtime
    from flows.sweep import sweep_flow

    with runtime(ray_address=ray_address or sw.base.compute.ray_address, num_cpus=sw.base.compute.num_cpus):
        rows = sweep_flow(sw, str(out))
    table = Table(title=f"sweep {sw.name}")
    for col in ("name", "status", "accuracy_decomposed", "consistency", "stability", "seconds"):
        table.add_column(col)
    for r in rows:
        table.add_row(*[str(r.get(c)) for c in ("name", "status", "accuracy_decomposed", "consistency", "stability",
                                                "seconds")])
    Console().print(table)


@registry_app.command("list")
def registry_list(uri: str = typer.Argument(..., help="registry URI (path or s3://bucket/prefix)")) -> None:
    """List the published entries."""
    from phpn_core.errors import PhpnError
    from phpn_core.storage.registry import PrototypeRegistry

    try:
        entries = PrototypeRegistry(uri).entries()
    except PhpnError as e:
        _fail(str(e))
    table = Table(title=f"registry {uri}")
    for col in ("entry", "kind", "model", "dataset", "k", "classes", "created"):
        table.add_column(col)
    for e in entries:
        table.add_row(e.entry_id, e.kind, e.model, e.dataset, str(e.k), str(e.n_classes), str(e.created))
    Console().print(table)


@registry_app.command("show")
def registry_show(uri: str = typer.Argument(...), entry: str = typer.Argument(...)) -> None:
    """Show one entry's metadata as JSON, with the metrics its run recorded (``recorded_metrics``, null if none)."""
    from phpn_core.errors import PhpnError
    from phpn_core.storage.registry import PrototypeRegistry

    try:
        reg = PrototypeRegistry(uri)
        info = reg.info(entry)
        recorded = reg.read_metrics(entry, version=info.version)
    except PhpnError as e:
        _fail(str(e))
    print(json.dumps({**info.model_dump(mode="json"), "recorded_metrics": recorded}, indent=2))


def _parse_classes(values: list[str] | None, class_names: list[str]) -> list[int] | None:
    """``--classes``: head rows or class names (repeatable, or comma-separated); None when not given."""
    if not values:
        return None
    index = {n: i for i, n in enumerate(class_names)}
    rows = []
    for item in (p.strip() for v in values for p in v.split(",")):
        if not item:
            continue
        if item.lstrip("-").isdigit():
            rows.append(int(item))
        elif item in index:
            rows.append(index[item])
        else:
            near = [n for n in class_names if item.lower() in n.lower()][:5]
            _fail(f"--classes: {item!r} is neither a head row nor a class name of the store; expected an integer "
                  f"in [0, {len(class_names)}) or one of its class names{f' (did you mean {near}?)' if near else ''}.")
    return sorted(set(rows)) or None


@app.command("decompose")
def decompose_store(
    features: str = typer.Argument(..., help="feature store URI (path or s3://bucket/prefix) of the training split"),
    head: str = typer.Option(..., "--head", help="safetensors file (path or s3://) with weight [C, D] and bias [C]"),
    k: int = typer.Option(..., "--k", min=1, help="prototypes per class"),
    out: Path = typer.Option(..., "--out", help="run directory (registry/, metrics.json)"),
    test: Optional[str] = typer.Option(None, "--test", help="test feature store URI: parity is checked on it"),
    classes: Optional[list[str]] = typer.Option(None, "--classes", help="head rows or class names to decompose "
                                                "(repeat or comma-separate); default: every class with images"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML for the decompose/compute/storage sections"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS", help="Ray cluster"),
) -> None:
    """Decompose the linear head HEAD over an existing feature store (no model, no images): the same Ray fan-out
    and registry entry as `phpn run`. Writes OUT/registry/ and OUT/metrics.json."""
    from phpn_core.config import load_config
    from phpn_core.errors import PhpnError

    t0 = time.perf_counter()
    try:
        from phpn_core.storage.feature_store import FeatureStore

        names = FeatureStore.open(features).schema.class_names
        rows = _parse_classes(classes, names)
        cfg = load_config(config, **({} if config else {"name": "decompose"}),
                          decompose={"k": k, **({"classes": rows} if rows else {})})
        quiet_environment()
        from flows.decompose import decompose_store_flow
        from flows.preflight import check_store_reachable
        from flows.runtime import runtime

        check_store_reachable(str(out.resolve()))
        if cfg.storage.registry_uri:
            check_store_reachable(cfg.storage.registry_uri)
        with runtime(ray_address=ray_address or cfg.compute.ray_address, num_cpus=cfg.compute.num_cpus) as rt:
            console.print(f"Prefect API: {rt.api_url}; Ray: {rt.ray_address or 'local'}")
            metrics = decompose_store_flow(cfg, features, head, str(out), test)
    except PhpnError as e:
        _fail(str(e))
    _summary(metrics, out, t0)


@baseline_app.command("protopnet")
def baseline_protopnet(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="run config YAML (configs/demo.yaml); its "
                                  "protopnet: section sets m, d, epochs, batch size, seed"),
    out: Path = typer.Option(..., "--out", help="run directory: model/, registry/ (shared with `phpn run`), "
                             "protopnet_metrics.json"),
    epochs: Optional[str] = typer.Option(None, "--epochs", help="WARM,JOINT,LAST epochs, overriding the config "
                                         "(e.g. 2,6,10 for a quick look)"),
) -> None:
    """ProtoPNet (Chen et al. 2019) trained on the same trunk (initialised from the model's trained weights) and
    data that `phpn run` decomposes, scored by the same ProtoEval code, published to the registry as an entry of
    kind "protopnet": `phpn serve` lists it beside phpn's entries and /compare shows both for a class."""
    from phpn_core.config import load_config
    from phpn_core.errors import PhpnError

    t0 = time.perf_counter()
    over: dict = {}
    if epochs is not None:
        try:
            warm, joint, last = (int(v) for v in epochs.split(","))
        except ValueError:
            _fail(f"--epochs must be three integers WARM,JOINT,LAST (e.g. 2,6,10); got {epochs!r}.")
        over["protopnet"] = {"warm_epochs": warm, "joint_epochs": joint, "last_layer_epochs": last}
    try:
        cfg = load_config(config, **over)  # deep-merged: the config's other protopnet keys stay
        quiet_environment()
        from flows.baseline import protopnet_flow
        from flows.runtime import prefect_server

        with prefect_server() as (url, started, _):
            console.print(f"Prefect API: {url} ({'temporary server' if started else 'configured'})")
            metrics = protopnet_flow(cfg, str(out))
    except PhpnError as e:
        _fail(str(e))
    table = Table(title=f"ProtoPNet baseline {metrics['entry_id']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ("accuracy", "accuracy_cnn", "consistency", "stability", "prototypes_per_class", "train_seconds",
              "seconds"):
        v = metrics.get(k)
        table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    Console().print(table)
    console.print(f"metrics:  {out / 'protopnet_metrics.json'}\nregistry: {metrics['registry']}  "
                  f"(phpn serve --registry {metrics['registry']})\nwall time {time.perf_counter() - t0:.1f} s")


@app.command()
def explain(
    image: Path = typer.Argument(..., help="an image file"),
    registry: str = typer.Option(..., "--registry", help="registry URI"),
    entry: str = typer.Option(..., "--entry", help="entry id (phpn registry list)"),
    out: Path = typer.Option(Path("explanation.png"), "--out", help="PNG to write"),
    top: int = typer.Option(3, "--top", min=1, help="classes to show"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="the model's checkpoint, when the entry's "
                                              "recorded one is not at hand"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
) -> None:
    """Explain one image: top classes, their prototypes' contributions and heatmaps over the image."""
    from phpn_core.errors import PhpnError
    from phpn_core.report.explain import explain_image_file

    try:
        path = explain_image_file(image, registry_uri=registry, entry_id=entry, out=out, top=top,
                                  checkpoint=str(checkpoint) if checkpoint else None, device=device)
    except PhpnError as e:
        _fail(str(e))
    console.print(f"wrote {path}")


@app.command()
def serve(
    registry: str = typer.Option(..., "--registry", help="registry URI (path or s3://bucket/prefix)"),
    host: str = typer.Option("127.0.0.1", "--host", help="interface to bind (default: this machine only)"),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port"),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0.001, help="cap on an uploaded image"),
    max_megapixels: float = typer.Option(25.0, "--max-megapixels", min=0.001, help="cap on an uploaded image"),
) -> None:
    """The prototype explorer: browse, compare and query the registry's entries in a browser (read-only)."""
    import uvicorn

    from explorer.app import create_app  # lazily: the other commands never import the web stack
    from phpn_core.errors import PhpnError

    try:
        web = create_app(registry, max_upload_bytes=int(max_upload_mb * 2**20),
                         max_pixels=int(max_megapixels * 1e6))
    except PhpnError as e:
        _fail(str(e))
    console.print(f"phpn explorer on http://{host}:{port}/ (API docs: /docs) over {web.state.data.registry.uri}")
    uvicorn.run(web, host=host, port=port, log_level="warning")


_STATE_DIR_OPT = typer.Option(None, "--state-dir", envvar="PHPN_CLUSTER_DIR",
                              help="PIDs, ports, logs, Prefect DB, Ray temp dir [default: ~/.phpn/cluster]")


@cluster_app.command("up")
def cluster_up(
    state_dir: Optional[Path] = _STATE_DIR_OPT,
    port: int = typer.Option(4200, "--port", envvar="PHPN_PREFECT_PORT", help="Prefect server (and UI) port"),
    ray_port: int = typer.Option(6379, "--ray-port", envvar="PHPN_RAY_PORT", help="Ray head (GCS) port"),
    head_cpus: int = typer.Option(1, "--head-cpus", min=1, help="CPUs the Ray head offers"),
    worker_cpus: int = typer.Option(1, "--worker-cpus", min=1, help="CPUs the second Ray node offers"),
    pool: str = typer.Option("phpn-local", "--pool", help="process work pool the worker polls (infra/prefect.yaml)"),
    timeout: float = typer.Option(240.0, "--timeout", min=1, help="seconds to wait for each component"),
) -> None:
    """Start a Prefect server on 127.0.0.1, a process worker, a Ray head and a second Ray node (resources
    node_head / node_b); record them in the state dir. `phpn cluster down` stops exactly these."""
    from flows.cluster import ClusterError, ClusterSpec, default_state_dir, up

    spec = ClusterSpec(state_dir=state_dir or default_state_dir(), prefect_port=port, ray_port=ray_port,
                       head_cpus=head_cpus, worker_cpus=worker_cpus, pool=pool, timeout_s=timeout)
    try:
        st = up(spec, echo=console.print)
    except ClusterError as e:
        _fail(str(e))
    console.print(f"[bold green]cluster up[/] (state in {st.state_dir})")
    console.print(f"Prefect UI:  {st.ui_url}")
    console.print(f"Prefect API: {st.prefect_api_url}   work pool: {st.pool}")
    console.print(f"Ray:         {st.ray_address} (2 nodes: node_head, node_b)")
    console.print(f'Use it from a shell: eval "$(phpn cluster env --state-dir {st.state_dir})"')
    print(f"UI: {st.ui_url}")


@cluster_app.command("down")
def cluster_down(
    state_dir: Optional[Path] = _STATE_DIR_OPT,
    grace: float = typer.Option(15.0, "--grace", min=0, help="seconds between SIGTERM and SIGKILL"),
) -> None:
    """Stop exactly the processes `phpn cluster up` recorded (their process groups and descendants)."""
    from flows.cluster import down

    res = down(state_dir, grace_s=grace)
    if res.get("note"):
        console.print(f"{res['note']} ({res['state_dir']})")
    elif res["remaining"]:
        _fail(f"processes still alive after SIGKILL: {res['remaining']}")
    else:
        console.print(f"cluster down: stopped {len(res['stopped'])} process(es) recorded in {res['state_dir']}")


@cluster_app.command("status")
def cluster_status(state_dir: Optional[Path] = _STATE_DIR_OPT,
                   as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Which recorded processes are alive; Prefect health; alive Ray nodes. Exit 1 when not running."""
    from flows.cluster import status

    st = status(state_dir)
    if as_json:
        print(json.dumps(st, indent=2))
    else:
        table = Table(title=f"phpn cluster ({st['state_dir']})")
        for col in ("process", "pid", "alive", "log"):
            table.add_column(col)
        for p in st["processes"]:
            table.add_row(p["name"], str(p["pid"]), str(p["alive"]), p["log"])
        Console().print(table)
        if st["running"]:
            console.print(f"UI {st['ui_url']}  prefect healthy: {st['prefect_healthy']}  ray nodes: {st['ray_nodes']}")
        else:
            console.print("not running")
    if not st["running"]:
        raise typer.Exit(1)


@cluster_app.command("env")
def cluster_env(state_dir: Optional[Path] = _STATE_DIR_OPT) -> None:
    """Print `export` lines for PREFECT_API_URL, RAY_ADDRESS and the Ray auth token: eval "$(phpn cluster env)"."""
    import shlex

    from flows.cluster import ClusterState, client_env, default_state_dir

    st = ClusterState.load(state_dir or default_state_dir())
    if st is None:
        _fail("no cluster recorded; start one with `phpn cluster up`.")
    for k, v in client_env(st).items():
        print(f"export {k}={shlex.quote(v)}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
