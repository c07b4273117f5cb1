"""Cluster operations, all real components, one machine.

One local cluster for the module (`phpn cluster up`: a Prefect server on a free loopback port, a process worker,
a Ray head and a second Ray node with the custom resources node_head / node_b); `prefect deploy --all` from the
repository root registers infra/prefect.yaml on it; one deployment run, triggered with `prefect deployment run`,
goes through the worker and spreads its pinned shards over both Ray nodes; the Prefect UI is read in headless
Chromium (driven over the DevTools protocol); the last test runs `phpn cluster down` and checks that nothing it
started is left while an unrelated process survives.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows.cluster import ClusterState, client_env, free_port, owned_processes, process_group

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::phpn_core.method.nmf.NMFConvergenceWarning")]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN_NAME = "clt"
POOL = "phpn-local"


def _bin(name: str) -> str:
    return str(BIN / name) if (BIN / name).is_file() else shutil.which(name) or name


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS", "PREFECT_PROFILE")}
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float, what: str, cwd: Path = REPO) -> str:
    """Run a command to completion; fail with its output when it exits non-zero or overruns."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what} did not finish within {timeout:.0f} s: {' '.join(cmd)}\n{(e.stdout or '')[-2000:]}")
    if r.returncode != 0:
        pytest.fail(f"{what} exited {r.returncode}: {' '.join(cmd)}\nstdout:\n{r.stdout[-3000:]}\n"
                    f"stderr:\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def _api(url: str, fn):
    """Run ``fn(client)`` with a Prefect client of the cluster's server (explicit URL: no global settings)."""
    from prefect.client.orchestration import PrefectClient

    async def go():
        async with PrefectClient(api=url) as client:
            return await fn(client)

    return asyncio.run(go())


def _tail(path: str | Path, n: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(missing)"


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cluster():
    """`phpn cluster up` on free ports, a short state dir (Ray's unix sockets live below it); down at the end."""
    state_dir = Path(tempfile.mkdtemp(prefix="phpn-cl-", dir="/tmp"))
    home = state_dir / "client-home"
    home.mkdir()
    env = _base_env(home)
    cmd = [_bin("phpn"), "cluster", "up", "--state-dir", str(state_dir), "--port", str(free_port()),
           "--ray-port", str(free_port()), "--timeout", "300"]
    try:
        _run(cmd, env, 600, "phpn cluster up")
        state = ClusterState.load(state_dir)
        assert state is not None and state.ready, f"no ready cluster recorded in {state_dir}"
        yield {"state": state, "state_dir": state_dir, "env": {**env, **client_env(state)}, "base_env": env}
    finally:
        if (state_dir / "cluster.json").exists():  # not stopped by the last test (a failure or -k selection)
            subprocess.run([_bin("phpn"), "cluster", "down", "--state-dir", str(state_dir), "--grace", "5"],
                           capture_output=True, timeout=120, env=env)
        left = ClusterState.load(state_dir)
        if left is None or not owned_processes(left):
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def deployed(cluster):
    """`prefect --no-prompt deploy --all` from the repository root (the root prefect.yaml is infra/prefect.yaml)."""
    out = _run([_bin("prefect"), "--no-prompt", "deploy", "--all"], cluster["env"], 300, "prefect deploy --all")
    return out


@pytest.fixture(scope="module")
def triggered(cluster, deployed, tmp_path_factory):
    """`prefect deployment run` of demo-nightly on a tiny config pinned to both Ray nodes; waits for a final state."""
    from prefect.client.schemas.objects import StateType

    tmp = tmp_path_factory.mktemp("cluster-run")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": RUN_NAME,
        "dataset": {"n_classes": 4, "train_per_class": 12, "test_per_class": 6, "image_size": 64},
        "model": {"train_epochs": 2}, "decompose": {"k": 3},
        "compute": {"classes_per_task": 1, "shard_resources": ["node_head", "node_b"]},
        "evaluate": {"enabled": False, "report": False}}))
    out_dir = tmp / "run"
    out = _run([_bin("prefect"), "deployment", "run", "phpn-run-config/demo-nightly", "--param", f"config={config}",
                "--param", f"out_dir={out_dir}"], cluster["env"], 180, "prefect deployment run")
    m = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert m, f"no flow run id in the output of prefect deployment run:\n{out}"
    run_id = m.group(1)
    url = cluster["state"].prefect_api_url
    final = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
    deadline = time.monotonic() + 480
    while True:
        run = _api(url, lambda c: c.read_flow_run(run_id))
        if run.state_type in final:
            break
        if time.monotonic() > deadline:
            worker_log = next(p.log for p in cluster["state"].processes if p.name == "prefect-worker")
            pytest.fail(f"flow run {run_id} still {run.state_type} after 480 s; worker log:\n{_tail(worker_log)}")
        time.sleep(2)
    return {"run": run, "config": config, "out_dir": out_dir}


# --------------------------------------------------------------------------------------------------------- tests


def test_cluster_up_runs_a_prefect_server_a_worker_and_two_ray_nodes(cluster):
    out = _run([_bin("phpn"), "cluster", "status", "--state-dir", str(cluster["state_dir"]), "--json"],
               cluster["base_env"], 120, "phpn cluster status")
    st = json.loads(out[out.index("{"):])
    assert st["running"] and st["ready"] and st["prefect_healthy"], st
    assert st["ray_nodes"] == 2, st
    assert [p["name"] for p in st["processes"]] == ["prefect-server", "ray-head", "ray-worker", "prefect-worker"]
    assert all(p["alive"] for p in st["processes"]), st["processes"]
    assert st["env"]["PREFECT_API_URL"].startswith("http://127.0.0.1:")
    # A second `up` on the same state dir refuses (and starts nothing).
    r = subprocess.run([_bin("phpn"), "cluster", "up", "--state-dir", str(cluster["state_dir"])],
                       capture_output=True, text=True, timeout=120, env=cluster["base_env"])
    assert r.returncode == 2 and "still running" in r.stderr.replace("\n", " "), r.stderr


def test_deploy_all_registers_the_deployments_with_their_cron_schedules(cluster, deployed):
    from flows.deployments import decompose_store, run_config, sweep_config

    assert (REPO / "prefect.yaml").resolve() == (REPO / "infra" / "prefect.yaml").resolve()
    spec = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    flow_names = {"flows/deployments.py:run_config": run_config.name,
                  "flows/deployments.py:sweep_config": sweep_config.name,
                  "flows/deployments.py:decompose_store": decompose_store.name}
    assert len(spec["deployments"]) >= 3
    for d in spec["deployments"]:
        name = f"{flow_names[d['entrypoint']]}/{d['name']}"
        dep = _api(cluster["state"].prefect_api_url, lambda c: c.read_deployment_by_name(name))
        assert dep.work_pool_name == POOL and dep.entrypoint == d["entrypoint"], name
        params = d.get("parameters", {})
        assert dep.parameters == params, name
        if "config" in params:
            assert (REPO / params["config"]).is_file(), f"{name}: its config {params['config']} is missing"
        got = [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules]
        assert got == [(s["cron"], s["timezone"], True) for s in d.get("schedules", [])], name
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    # The parameter schema is plain JSON (what the UI's Run form and schedules need).
    dep = _api(cluster["state"].prefect_api_url, lambda c: c.read_deployment_by_name("phpn-run-config/demo-nightly"))
    assert set(dep.parameter_openapi_schema["properties"]) == {"config", "out_dir", "ray_address"}


def test_kubernetes_work_pool_template_and_deployments_register(cluster):
    env = cluster["env"]
    _run([_bin("prefect"), "work-pool", "create", "phpn-k8s", "--type", "kubernetes", "--base-job-template",
          "infra/k8s/base-job-template.json"], env, 120, "prefect work-pool create (kubernetes)")
    _run([_bin("prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "infra/k8s/prefect.yaml"], env, 300,
         "prefect deploy --all --prefect-file infra/k8s/prefect.yaml")
    url = cluster["state"].prefect_api_url
    pool = _api(url, lambda c: c.read_work_pool("phpn-k8s"))
    props = pool.base_job_template["variables"]["properties"]
    assert pool.type == "kubernetes" and props["env"]["default"]["RAY_ADDRESS"].endswith(":6379")
    manifest = pool.base_job_template["job_configuration"]["job_manifest"]
    assert manifest["kind"] == "Job"
    dep = _api(url, lambda c: c.read_deployment_by_name("phpn-sweep-config/sweep-s3-nightly-k8s"))
    assert dep.work_pool_name == "phpn-k8s" and dep.job_variables["image"].startswith("ghcr.io/")
    assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/phpn"}}]


def test_deployment_run_completes_through_the_worker_and_writes_a_registry_entry(cluster, triggered):
    from phpn_core.storage.registry import PrototypeRegistry

    run = triggered["run"]
    worker_log = next(p.log for p in cluster["state"].processes if p.name == "prefect-worker")
    assert run.state.is_completed(), f"flow run ended {run.state_type}: {run.state.message}\n{_tail(worker_log)}"
    assert run.work_pool_name == POOL and run.deployment_id is not None
    assert run.name == "run-tiny"
    metrics = json.loads((triggered["out_dir"] / "metrics.json").read_text())
    entries = PrototypeRegistry(str(triggered["out_dir"] / "registry")).entries()
    assert [e.entry_id for e in entries] == [metrics["entry_id"]]
    assert entries[0].n_classes == 4 and entries[0].k == 3
    assert metrics["accuracy_original"] == metrics["accuracy_decomposed"] and metrics["max_abs_logit_diff"] <= 1e-4


def _raylet_node_of(logs: Path) -> dict[str, str]:
    """Ray's own record of which node started which worker process: ``{pid: custom resource of that node}``."""
    out: dict[str, str] = {}
    for log in sorted(logs.glob("raylet*.out")):
        text = log.read_text(errors="replace")
        init = re.search(r"InitialConfigResources: \{([^}]*)\}", text)
        assert init, f"{log} has no InitialConfigResources line yet"
        node = next((r for r in ("node_head", "node_b") if f"{r}: 1" in init.group(1)), None)
        for pid in re.findall(r"Started worker process with pid (\d+)", text):
            out[pid] = node
    return out


def test_pinned_shards_ran_on_both_ray_nodes_and_equal_the_single_node_result(cluster, triggered):
    import torch

    from phpn_core import decompose_head
    from phpn_core.config import load_config
    from phpn_core.storage.registry import PrototypeRegistry
    from phpn_core.storage.feature_store import FeatureStore
    from phpn_core.storage.tensorio import read_tensors

    assert triggered["run"].state.is_completed()
    out = triggered["out_dir"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["shard_pins"] == ["node_head", "node_b", "node_head", "node_b"]
    pids = {w.rsplit(":", 1)[1] for w in metrics["shard_workers"]}
    started_by = _raylet_node_of(Path(cluster["state"].ray_temp_dir) / "session_latest" / "logs")
    nodes = {started_by.get(pid) for pid in pids}
    assert nodes == {"node_head", "node_b"}, f"shard workers {pids} were started by {started_by}"

    # The same decomposition in this process, shard by shard (one class each), on the same stored features.
    cfg = load_config(triggered["config"])
    registry = PrototypeRegistry(str(out / "registry"))
    head, _ = registry.load(metrics["entry_id"])
    arrays = registry.load_arrays(metrics["entry_id"])
    linear, _ = read_tensors(str(out / "registry" / "inputs" / metrics["entry_id"] / "linear.safetensors"))
    store = FeatureStore.open(str(out / "features" / "train.zarr"))
    d = cfg.decompose
    options = {"normalization": d.normalization, "target": d.target, "refine_ridge": d.refine_ridge,
               "refine_iter": d.refine_iter, "nmf_options": d.nmf_options()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray worker (OMP_NUM_THREADS=1)
    try:
        for c in store.classes:
            hd = decompose_head({c: store.class_features(c)}, linear["weight"].float(), d.k, seed=d.seed,
                                device="cpu", **options)
            assert torch.equal(hd.prototypes[0], head.prototypes[c]), f"class {c}: prototypes differ"
            assert torch.equal(hd.alpha[0], arrays["alpha"][c]), f"class {c}: alphas differ"
    finally:
        torch.set_num_threads(threads)


class _Chromium:
    """Headless Chromium driven over the DevTools protocol (navigate, evaluate JS, click, screenshot)."""

    def __init__(self, binary: str, tmp: Path, size: tuple[int, int] = (1400, 1000)):
        from websockets.sync.client import connect

        profile = tmp / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
               "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
               "--remote-debugging-port=0", "--remote-allow-origins=*", f"--window-size={size[0]},{size[1]}",
               f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "HOME": str(tmp)}, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise AssertionError("chromium did not open its DevTools port within 60 s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=30).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=2**27, open_timeout=30)
        self._id = 0

    def call(self, method: str, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, js: str):
        return self.call("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value")

    def text(self) -> str:
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, needles: list[str], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {[n for n in needles if n not in text]} not on the page after "
                                     f"{timeout:.0f} s; page text:\n{text[:2000]}")
            time.sleep(0.25)

    def click_text(self, label: str, timeout: float = 30.0) -> bool:
        """Click the first tab/button/link/list item whose text is ``label`` (retried until it is rendered)."""
        js = ("(() => { const el = [...document.querySelectorAll('[role=tab], button, a, li')]"
              f".find(e => e.offsetParent !== null && e.textContent.trim() === {json.dumps(label)});"
              " if (el) el.click(); return !!el; })()")
        deadline = time.monotonic() + timeout
        while not self.eval(js):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)
        return True

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def test_prefect_ui_flow_run_page_shows_the_runs_artifacts(cluster, triggered, tmp_path):
    import numpy as np
    from PIL import Image
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    url = cluster["state"].prefect_api_url
    keys = [f"phpn-{RUN_NAME}-metrics", f"phpn-{RUN_NAME}-classes"]
    arts = _api(url, lambda c: c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))))
    assert sorted(a.key for a in arts) == sorted(keys), [a.key for a in arts]
    run_id = arts[0].flow_run_id  # the decompose subflow of the deployment run, which published them
    run = _api(url, lambda c: c.read_flow_run(run_id))
    assert run.parent_task_run_id is not None and run.state.is_completed()

    browser = _Chromium(binary, tmp_path)
    try:
        browser.call("Page.enable")
        browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", url=f"{cluster['state'].ui_url}/runs/flow-run/{run_id}?tab=Artifacts")
        browser.wait_for_text([run.name, "Completed", "Artifacts"], 90, "the flow-run page")
        assert browser.click_text("Artifacts"), "no Artifacts tab on the flow-run page"
        text = browser.wait_for_text(keys + ["phpn metrics", "Per-class diagnostics"], 60, "the Artifacts tab")
        assert "Can't connect to Server API" not in text
        png = browser.screenshot()
        (tmp_path / "flow-run.png").write_bytes(png)
        # The markdown artifact's own page renders its metric table.
        metrics_art = next(a for a in arts if a.key == keys[0])
        browser.call("Page.navigate", url=f"{cluster['state'].ui_url}/artifacts/artifact/{metrics_art.id}")
        browser.wait_for_text(["max_abs_logit_diff", "accuracy_decomposed", "Registry entry"], 90,
                              "the metrics artifact page")
    finally:
        browser.close()
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    assert img.shape[:2] == (1000, 1400), img.shape
    assert img.std() > 10, "blank screenshot"
    assert len(np.unique(img.reshape(-1, 3)[::7], axis=0)) > 50, "screenshot has almost no distinct colours"


def test_cluster_down_stops_exactly_what_up_started(cluster):
    state: ClusterState = cluster["state"]
    # Something that is not ours, in its own session, must survive.
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        before = owned_processes(state)
        assert {p.pid for p in state.processes} <= before and len(before) > len(state.processes)
        out = _run([_bin("phpn"), "cluster", "down", "--state-dir", str(cluster["state_dir"])], cluster["base_env"],
                   120, "phpn cluster down")
        assert "cluster down: stopped" in out, out
        alive = sorted(pid for pid in before if Path(f"/proc/{pid}").exists() and _not_zombie(pid))
        assert alive == [], f"still running after down: {[_cmdline(p) for p in alive]}"
        assert all(not process_group(p.pid) for p in state.processes)
        assert not (cluster["state_dir"] / "cluster.json").exists()
        assert bystander.poll() is None, "down stopped a process it did not start"
        port = int(state.prefect_api_url.rsplit(":", 1)[1].split("/")[0])
        import socket

        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "the Prefect server still listens"
        r = subprocess.run([_bin("phpn"), "cluster", "status", "--state-dir", str(cluster["state_dir"])],
                           capture_output=True, text=True, timeout=120, env=cluster["base_env"])
        assert r.returncode == 1 and "not running" in r.stderr
    finally:
        bystander.kill()
        bystander.wait()


def _not_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _cmdline(pid: int) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return f"{pid}: (gone)"
