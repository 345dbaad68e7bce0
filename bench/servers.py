"""Servers the benchmarks start on loopback: the node as deployed, and the baseline storage SCPs.

Every server runs as its own process on a free port, writes into a folder of the benchmark's
work directory, and is stopped by `stop` (SIGTERM, then SIGKILL after a grace period). The
benchmarks use each server as a context manager, so a failed run stops it too.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
NODE_AE_TITLE = "LIBRA_NODE"
MODALITY_AE_TITLE = "MODALITY1"
BASELINE_AE_TITLE = "STORESCP"
STOP_GRACE_SECONDS = 30.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_seconds: float, process: subprocess.Popen | None = None) -> None:
    """Block until a server accepts TCP connections on 127.0.0.1:port.

    Raises
    ------
    RuntimeError
        When `process` exits before the port opens.
    TimeoutError
        When the port is still closed after `timeout_seconds`.
    """
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_seconds} s")


@functools.cache
def dcmtk_tool(name: str) -> str:
    """Return the path of a dcmtk program on PATH, skipping pynetdicom's apps of the same name.

    pynetdicom installs `storescu` and `storescp` console scripts into the virtual environment,
    which come first on PATH while it is active, so the version output is checked.

    Raises
    ------
    FileNotFoundError
        When no dcmtk program of that name is on PATH; install the Debian package dcmtk.
    """
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        version = subprocess.run([str(candidate), "--version"], capture_output=True, text=True, timeout=30)
        if "dcmtk" in (version.stdout + version.stderr).lower():
            return str(candidate)
    raise FileNotFoundError(f"dcmtk's {name} is not on PATH: install the Debian package dcmtk")


def read_memory_kib(pid: int) -> dict[str, int]:
    """Return VmRSS and VmHWM (peak resident set) of a process in KiB, from /proc/PID/status."""
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status_file:
        for line in status_file:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def node_command() -> list[str]:
    """Return the command that starts `libra-node`: the console script beside this Python, else `-m node.cli`."""
    script = Path(sys.executable).parent / "libra-node"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "node.cli"]


def read_cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of a process and its waited-for children, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat_file:
        fields = stat_file.read().rpartition(")")[2].split()
    # Fields 14 to 17 of proc(5): utime, stime, cutime, cstime; the split starts at field 3.
    ticks = sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def read_machine_busy_seconds() -> float:
    """Return the CPU time all processes spent busy since boot (every core), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat_file:
        values = [int(value) for value in stat_file.readline().split()[1:]]
    # The first line is user, nice, system, idle, iowait, irq, softirq, steal, ...: idle and
    # iowait are not busy, and the guest columns are already counted in user.
    busy_ticks = sum(values[:8]) - values[3] - values[4]
    return busy_ticks / os.sysconf("SC_CLK_TCK")


def checkout_environment(checkout: Path = REPO_ROOT) -> dict[str, str]:
    """Return the environment of child processes, with `checkout` first on the module path."""
    environment = dict(os.environ)
    existing = environment.get("PYTHONPATH", "")
    environment["PYTHONPATH"] = str(checkout) + (os.pathsep + existing if existing else "")
    environment.setdefault("HF_HUB_OFFLINE", "1")
    return environment


@dataclass
class ServerProcess:
    """A server process on a loopback port, with its log file and output folder."""

    name: str
    command: list[str]
    port: int
    output_dir: Path
    log_path: Path
    ready_timeout_seconds: float = 60.0
    environment: dict[str, str] | None = None
    process: subprocess.Popen | None = field(default=None, init=False)

    def start(self) -> "ServerProcess":
        """Start the process and return once it accepts connections."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=str(REPO_ROOT),
            env=self.environment,
            start_new_session=True,
        )
        try:
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ready(self) -> None:
        """Block until the server accepts associations."""
        wait_for_port(self.port, self.ready_timeout_seconds, self.process)

    @property
    def pid(self) -> int:
        """Process id of the server."""
        return self.process.pid

    def stop(self) -> int | None:
        """Stop the server with SIGTERM (SIGKILL after a grace period) and return its exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def received_files(self) -> int:
        """Return the number of files the server wrote into its output folder."""
        return sum(1 for path in self.output_dir.rglob("*") if path.is_file() and path.parent.name != ".incoming")


class NodeProcess(ServerProcess):
    """`libra-node run` with a configuration file written for the benchmark."""

    def wait_until_ready(self) -> None:
        """Block until the node's log has its `node.ready` line (the receiver is listening)."""
        deadline = time.monotonic() + self.ready_timeout_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"libra-node exited with status {self.process.returncode} before node.ready; see {self.log_path}"
                )
            if any(event.get("event") == "node.ready" for event in self.log_events()):
                return
            time.sleep(0.05)
        raise TimeoutError(f"libra-node logged no node.ready within {self.ready_timeout_seconds} s; see {self.log_path}")

    def log_events(self) -> list[dict]:
        """Return the node's JSON log lines parsed so far (other lines are skipped)."""
        events = []
        with self.log_path.open("rb") as log_file:
            for line in log_file:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        return events

    def received_files(self) -> int:
        """Return the number of instances in the node's file store (temporary files excluded)."""
        store = self.output_dir / "store"
        return sum(1 for path in store.rglob("*.dcm") if ".incoming" not in path.parts)


def write_node_config(path: Path, data_dir: Path, port: int, **sections: dict) -> Path:
    """Write a TOML node configuration for a benchmark node on 127.0.0.1 and return its path.

    `sections` update the tables of the same name (for example `worker={"enabled": False}`);
    a list value such as `destinations=[...]` replaces the array of tables.
    """
    tables: dict[str, dict | list] = {
        "node": {
            "ae_title": NODE_AE_TITLE,
            "bind_address": "127.0.0.1",
            "port": port,
            "data_dir": str(data_dir),
        },
        "callers": [{"ae_title": MODALITY_AE_TITLE}],
        "logging": {"format": "json", "level": "info"},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(tables.get(name), dict):
            tables[name] = tables[name] | values
        else:
            tables[name] = values
    lines = []
    for name, values in tables.items():
        entries = values if isinstance(values, list) else [values]
        for entry in entries:
            lines.append(f"[[{name}]]" if isinstance(values, list) else f"[{name}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in entry.items())
            lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value))


def start_node(
    work_dir: Path, name: str, run_worker: bool, checkout: Path = REPO_ROOT, **sections: dict
) -> NodeProcess:
    """Start `libra-node run` with a fresh data folder under `work_dir` and return it once ready.

    `checkout` is the repository whose `node` package runs, this one by default; another
    checkout gives before and after figures from one benchmark script.
    """
    port = free_port()
    data_dir = work_dir / name
    config_path = write_node_config(work_dir / f"{name}.toml", data_dir, port, **sections)
    command = [*node_command(), "run", "--config", str(config_path)]
    if not run_worker:
        command.append("--no-worker")
    node = NodeProcess(
        name="node",
        command=command,
        port=port,
        output_dir=data_dir,
        log_path=work_dir / f"{name}.log",
        environment=checkout_environment(checkout),
        ready_timeout_seconds=300.0,
    )
    return node.start()


def pynetdicom_storescp(work_dir: Path, name: str) -> ServerProcess:
    """Return (not started) pynetdicom's storescp app writing into a fresh folder, with its default PDU size."""
    port = free_port()
    output_dir = work_dir / name
    command = [
        sys.executable, "-m", "pynetdicom", "storescp", str(port),
        "--ae-title", BASELINE_AE_TITLE, "--bind-address", "127.0.0.1",
        "--output-directory", str(output_dir),
    ]
    return ServerProcess("pynetdicom", command, port, output_dir, work_dir / f"{name}.log")


def dcmtk_storescp(work_dir: Path, name: str, fork: bool) -> ServerProcess:
    """Return (not started) dcmtk's storescp writing into a fresh folder, with its default PDU size.

    NOTE: dcmtk 3.6.7's storescp has no bind-address option, so it listens on every interface
    while it runs; the benchmark sends to it on 127.0.0.1 only.
    """
    port = free_port()
    output_dir = work_dir / name
    command = [dcmtk_tool("storescp"), "--aetitle", BASELINE_AE_TITLE, "--output-directory", str(output_dir)]
    if fork:
        command.append("--fork")
    command.append(str(port))
    return ServerProcess("dcmtk-fork" if fork else "dcmtk", command, port, output_dir, work_dir / f"{name}.log")
