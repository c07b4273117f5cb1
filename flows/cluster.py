"""A local cluster in one command: a Prefect server + a process worker, and a two-node Ray (head + one worker node).

``up`` starts each component with ``subprocess.Popen(..., start_new_session=True)``, so each one leads its own
process group (Ray's ``ray start --block`` keeps its GCS, raylet and agents in that group), and records PIDs,
process-group ids, start times, ports and log files in ``STATE_DIR/cluster.json``. ``down`` stops exactly those
groups (and any descendants that left them, such as Prefect's flow-run processes), SIGTERM first, SIGKILL after a
grace period, and nothing else: it never runs ``ray stop`` or matches processes by name.

State directory: ``--state-dir``, else ``PHPN_CLUSTER_DIR``, else ``~/.phpn/cluster``. It holds ``cluster.json``,
``logs/``, ``prefect-home/`` (the server's SQLite database) and ``ray/`` (Ray's temp dir) plus the Ray auth token.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from phpn_core.errors import PhpnError

STATE_ENV = "PHPN_CLUSTER_DIR"
STATE_FILE = "cluster.json"
REPO_DIR = Path(__file__).resolve().parents[1]
HEAD_RESOURCE = "node_head"
WORKER_RESOURCE = "node_b"
_SOCKET_DIR_MAX = 40  # Ray's unix sockets live ~70 chars below its temp dir; AF_UNIX paths stop at 107


class ClusterError(PhpnError, RuntimeError):
    """The local cluster could not be started, inspected or stopped."""


@dataclass(frozen=True)
class ClusterSpec:
    """What ``up`` starts. Ports must be free on this machine."""

    state_dir: Path
    prefect_port: int = 4200
    ray_port: int = 6379
    host: str = "127.0.0.1"
    head_cpus: int = 1
    worker_cpus: int = 1
    object_store_bytes: int = 256 * 2**20
    pool: str = "phpn-local"
    repo_dir: Path = REPO_DIR
    timeout_s: float = 240.0


@dataclass
class Proc:
    """One started component: its PID (= its process group id) and its start time (guards against PID reuse)."""

    name: str
    pid: int
    start_time: int
    cmd: list[str]
    log: str


@dataclass
class ClusterState:
    state_dir: str
    prefect_api_url: str
    ui_url: str
    ray_address: str
    pool: str
    ray_temp_dir: str
    env: dict[str, str]
    processes: list[Proc] = field(default_factory=list)
    ready: bool = False

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState | None:
        path = Path(state_dir) / STATE_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        data["processes"] = [Proc(**p) for p in data.get("processes", [])]
        return cls(**data)


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV) or Path.home() / ".phpn" / "cluster").expanduser().resolve()


# ------------------------------------------------------------------------------------------------ /proc helpers


def _stat(pid: int) -> tuple[int, int, int, str] | None:
    """``(ppid, pgid, start_time, state)`` of a live process from /proc, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # fields after "pid (comm) "
    state, ppid, pgid, start = rest[0], int(rest[1]), int(rest[2]), int(rest[19])
    return (None if state in ("Z", "X") else (ppid, pgid, start, state))


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def process_group(pgid: int) -> set[int]:
    """Live processes in process group ``pgid``."""
    return {pid for pid in _all_pids() if (st := _stat(pid)) is not None and st[1] == pgid}


def descendants(pids: Iterable[int]) -> set[int]:
    """Live descendants of ``pids`` (not the pids themselves)."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None:
            children.setdefault(st[0], []).append(pid)
    out: set[int] = set()
    todo = list(pids)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def is_ours(proc: Proc) -> bool:
    """The recorded process is alive and is the one we started (same PID and start time)."""
    st = _stat(proc.pid)
    return st is not None and st[2] == proc.start_time


def owned_processes(state: ClusterState) -> set[int]:
    """Every live process ``up`` started: the recorded leaders, their process groups and their descendants.

    A group whose leader is gone still counts: Linux does not reuse a PID while a group of that id exists.
    """
    pids: set[int] = set()
    for p in state.processes:
        leader_alive = _stat(p.pid) is not None
        if leader_alive and not is_ours(p):
            continue  # PID reused by something else: not ours
        group = process_group(p.pid)
        pids |= group | ({p.pid} if leader_alive else set())
    return pids | descendants(pids)


# ------------------------------------------------------------------------------------------------ small helpers


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port_free(port: int, what: str, option: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            raise ClusterError(f"port {port} for the {what} is in use; pick another with {option} PORT "
                               "(or stop what listens there).") from None


def _bin(name: str) -> str:
    """A console script of this environment (the venv's prefect/ray), else one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise ClusterError(f"`{name}` not found next to {sys.executable} or on PATH; install phpn's dependencies "
                           "(make venv).")
    return found


def _log_tail(path: str | Path, n: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _wait(what: str, ready: Callable[[], bool], timeout_s: float, procs: list[Proc], poll_s: float = 0.5) -> None:
    """Poll ``ready`` until true; fail early (with the log tail) when a component died, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if ready():
            return
        for p in procs:
            if not is_ours(p):
                raise ClusterError(f"{p.name} exited while waiting for {what}; last lines of {p.log}:\n"
                                   f"{_log_tail(p.log)}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.log}\n{_log_tail(p.log, 10)}" for p in procs)
            raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}; logs:\n{logs}")
        time.sleep(poll_s)


def _http_json(url: str, body: dict | None = None, timeout: float = 5.0):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def _prefect_healthy(api_url: str) -> bool:
    try:
        return _http_json(f"{api_url}/health", timeout=3) is True
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _worker_online(api_url: str, pool: str) -> bool:
    try:
        workers = _http_json(f"{api_url}/work_pools/{pool}/workers/filter", body={})
    except (OSError, urllib.error.URLError, ValueError):
        return False
    return any(w.get("status") == "ONLINE" for w in workers or [])


def ray_alive_nodes(address: str, env: dict[str, str]) -> int:
    """Number of alive Ray nodes, from ``ray status`` (0 when the cluster cannot be reached yet)."""
    try:
        r = subprocess.run([_bin("ray"), "status", "--address", address], capture_output=True, text=True,
                           timeout=60, env=env)
    except subprocess.TimeoutExpired:
        return 0
    if r.returncode != 0 or "Active:" not in r.stdout:
        return 0
    active = r.stdout.split("Active:", 1)[1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if line.strip().split(" ", 1)[-1].startswith("node_"))


# ------------------------------------------------------------------------------------------------ up / down


def _launch(name: str, cmd: list[str], env: dict[str, str], log_dir: Path, cwd: Path) -> Proc:
    log = log_dir / f"{name}.log"
    with open(log, "ab") as fh:
        popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 cwd=cwd, start_new_session=True)
    st = _stat(popen.pid)
    # The child is reaped by nobody once this process exits; when `up` runs in a long-lived process (tests),
    # the Popen object keeps it reapable, so remember it.
    _CHILDREN[popen.pid] = popen
    return Proc(name=name, pid=popen.pid, start_time=st[2] if st else -1, cmd=cmd, log=str(log))


_CHILDREN: dict[int, subprocess.Popen] = {}


def _ray_temp_dir(state_dir: Path) -> Path:
    d = state_dir / "ray"
    if len(str(d)) <= _SOCKET_DIR_MAX:
        d.mkdir(parents=True, exist_ok=True)
        return d
    return Path(tempfile.mkdtemp(prefix="phpn-ray-"))  # short path for Ray's sockets; removed by `down`


def _base_env(spec: ClusterSpec, state_dir: Path, ray_tmp: Path, token_path: Path) -> dict[str, str]:
    from flows.runtime import QUIET_PREFECT_ENV

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS")}
    env.update(QUIET_PREFECT_ENV)
    env.update({
        "PREFECT_HOME": str(state_dir / "prefect-home"),
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def client_env(state: ClusterState) -> dict[str, str]:
    """What a shell needs to use the cluster (``eval "$(phpn cluster env)"``)."""
    keys = ("PREFECT_API_URL", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "PHPN_REPO_DIR")
    return {k: state.env[k] for k in keys if k in state.env}


def up(spec: ClusterSpec, *, echo: Callable[[str], None] = lambda s: None) -> ClusterState:
    """Start the Prefect server, a Ray head, a second Ray node and a Prefect process worker; wait until ready."""
    state_dir = Path(spec.state_dir).expanduser().resolve()
    old = ClusterState.load(state_dir)
    if old is not None and owned_processes(old):
        raise ClusterError(f"a cluster recorded in {state_dir / STATE_FILE} is still running "
                           f"(UI {old.ui_url}); stop it with `phpn cluster down --state-dir {state_dir}`.")
    _check_port_free(spec.prefect_port, "Prefect server", "--port")
    _check_port_free(spec.ray_port, "Ray head (GCS)", "--ray-port")
    log_dir = state_dir / "logs"
    for d in (log_dir, state_dir / "prefect-home"):
        d.mkdir(parents=True, exist_ok=True)
    token_path = state_dir / "ray-auth-token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    ray_tmp = _ray_temp_dir(state_dir)
    env = _base_env(spec, state_dir, ray_tmp, token_path)
    api_url = f"http://{spec.host}:{spec.prefect_port}/api"
    ray_address = f"127.0.0.1:{spec.ray_port}"
    client = {"PREFECT_API_URL": api_url, "RAY_ADDRESS": ray_address, "PHPN_REPO_DIR": str(spec.repo_dir)}
    state = ClusterState(state_dir=str(state_dir), prefect_api_url=api_url,
                         ui_url=f"http://{spec.host}:{spec.prefect_port}", ray_address=ray_address, pool=spec.pool,
                         ray_temp_dir=str(ray_tmp), env={**{k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH",
                                                                                  "PREFECT_HOME")}, **client})

    def start(name: str, cmd: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        p = _launch(name, cmd, {**env, **(extra_env or {})}, log_dir, spec.repo_dir)
        state.processes.append(p)
        state.save()  # recorded at once: `down` can stop a half-started cluster
        echo(f"started {name} (pid {p.pid}), log {p.log}")
        return p

    ray_common = ["--block", "--disable-usage-stats", f"--object-store-memory={spec.object_store_bytes}"]
    try:
        server = start("prefect-server", [_bin("prefect"), "server", "start", "--host", spec.host,
                                          "--port", str(spec.prefect_port)],
                       # the UI asks the API at PREFECT_UI_API_URL, which defaults to port 4200 whatever --port says
                       extra_env={"PREFECT_UI_API_URL": api_url, "PREFECT_SERVER_API_HOST": spec.host,
                                  "PREFECT_SERVER_API_PORT": str(spec.prefect_port)})
        head = start("ray-head", [_bin("ray"), "start", "--head", f"--port={spec.ray_port}",
                                  f"--num-cpus={spec.head_cpus}", f"--resources={json.dumps({HEAD_RESOURCE: 1})}",
                                  f"--temp-dir={ray_tmp}", f"--ray-client-server-port={free_port()}",
                                  f"--dashboard-port={free_port()}", "--include-dashboard=false",
                                  f"--dashboard-agent-listen-port={free_port()}", *ray_common])
        _wait("the Ray head's GCS port", lambda: _port_open(spec.ray_port), spec.timeout_s, [head])
        node_b = start("ray-worker", [_bin("ray"), "start", f"--address={ray_address}",
                                      f"--num-cpus={spec.worker_cpus}",
                                      f"--resources={json.dumps({WORKER_RESOURCE: 1})}",
                                      f"--dashboard-agent-listen-port={free_port()}", *ray_common])
        _wait(f"the Prefect server at {api_url}", lambda: _prefect_healthy(api_url), spec.timeout_s, [server])
        worker = start("prefect-worker", [_bin("prefect"), "worker", "start", "--pool", spec.pool, "--type", "process",
                                          "--name", f"phpn-local-{os.getpid()}"], extra_env=client)
        _wait("two alive Ray nodes", lambda: ray_alive_nodes(ray_address, env) >= 2, spec.timeout_s, [head, node_b],
              poll_s=2.0)
        _wait(f"a worker online in work pool {spec.pool!r}", lambda: _worker_online(api_url, spec.pool),
              spec.timeout_s, [worker, server])
    except BaseException:
        down(state_dir)
        raise
    state.ready = True
    state.save()
    return state


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def down(state_dir: Path | None = None, *, grace_s: float = 15.0) -> dict:
    """Stop what ``up`` recorded in ``state_dir``: SIGTERM, then SIGKILL after ``grace_s``. Returns a summary."""
    state_dir = Path(state_dir or default_state_dir()).expanduser().resolve()
    state = ClusterState.load(state_dir)
    if state is None:
        return {"state_dir": str(state_dir), "stopped": [], "note": "no cluster recorded here"}
    targets = owned_processes(state)
    # Prefect worker first (its flow runs with it), then the Ray worker node, the head, the server.
    for p in reversed(state.processes):
        if is_ours(p):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    _signal_all(targets, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_stat(pid) is not None for pid in targets):
        _reap()
        time.sleep(0.2)
    leftover = {pid for pid in targets if _stat(pid) is not None} | owned_processes(state)
    _signal_all(leftover, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and any(_stat(pid) is not None for pid in leftover):
        _reap()
        time.sleep(0.1)
    _reap()
    still = sorted(pid for pid in targets | leftover if _stat(pid) is not None)
    if not still:
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        if Path(state.ray_temp_dir).parent != state_dir:  # a short temp dir outside the state dir
            shutil.rmtree(state.ray_temp_dir, ignore_errors=True)
    return {"state_dir": str(state_dir), "stopped": sorted(targets), "killed": sorted(leftover), "remaining": still}


def _reap() -> None:
    for pid, popen in list(_CHILDREN.items()):
        if popen.poll() is not None:
            _CHILDREN.pop(pid, None)


def status(state_dir: Path | None = None) -> dict:
    """What is recorded and whether each component is alive; Prefect's health and the Ray node count."""
    state_dir = Path(state_dir or default_state_dir()).expanduser().resolve()
    state = ClusterState.load(state_dir)
    if state is None:
        return {"state_dir": str(state_dir), "running": False, "processes": []}
    procs = [{"name": p.name, "pid": p.pid, "alive": is_ours(p), "log": p.log} for p in state.processes]
    env = {**os.environ, "RAY_AUTH_MODE": state.env.get("RAY_AUTH_MODE", "token"),
           "RAY_AUTH_TOKEN_PATH": state.env.get("RAY_AUTH_TOKEN_PATH", "")}
    up_ = any(p["alive"] for p in procs)
    alive = {p["name"] for p in procs if p["alive"]}
    return {"state_dir": str(state_dir), "running": up_, "ready": state.ready, "ui_url": state.ui_url,
            "prefect_api_url": state.prefect_api_url,
            "prefect_healthy": "prefect-server" in alive and _prefect_healthy(state.prefect_api_url),
            "ray_address": state.ray_address,
            "ray_nodes": ray_alive_nodes(state.ray_address, env) if "ray-head" in alive else 0,
            "pool": state.pool, "processes": procs, "env": client_env(state)}
