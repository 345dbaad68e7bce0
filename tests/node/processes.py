"""Node processes for tests that need real processes: kill -9, several receivers and workers.

Each process runs `python -m node.cli` with a TOML file written by the test, logs JSON lines to
a file, and is killed at the end of the test if it is still running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import tomlkit
from pynetdicom import AE, evt
from pynetdicom.sop_class import BasicTextSRStorage, ComprehensiveSRStorage, EnhancedSRStorage

from tests.peers import REPO_ROOT, free_port

READY_EVENTS = {"run": "node.ready", "worker": "worker.ready"}


class NodeProcess:
    """One `libra-node run` or `libra-node worker` process started from a configuration document."""

    def __init__(self, workdir: Path, name: str, document: dict, command: str = "run", extra_args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.command = command
        self.config_path = workdir / f"{name}.toml"
        # Each start gets its own log, so a restart never reads the events of the process before it.
        self.log_path = workdir / f"{name}.log"
        restart_number = 1
        while self.log_path.exists():
            restart_number += 1
            self.log_path = workdir / f"{name}.{restart_number}.log"
        self.config_path.write_text(tomlkit.dumps(document))
        self.port = document.get("node", {}).get("port")
        environment = os.environ | {"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "node.cli", command, "--config", str(self.config_path), *extra_args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=workdir,
            )

    def events(self) -> list[dict]:
        """Return the JSON log events written so far."""
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return events

    def wait_for_event(self, event: str, timeout_seconds: float = 120, count: int = 1) -> list[dict]:
        """Wait until the log contains `count` events named `event`; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            found = [entry for entry in self.events() if entry.get("event") == event]
            if len(found) >= count:
                return found
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} logged {len(found)} {event} events, expected {count}")
            time.sleep(0.2)

    def wait_ready(self, timeout_seconds: float = 120) -> NodeProcess:
        """Wait for the process's ready event and return self."""
        self.wait_for_event(READY_EVENTS[self.command], timeout_seconds)
        return self

    def kill(self) -> None:
        """Send SIGKILL, as a crash or `kill -9` would, and reap the process."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, timeout_seconds: float = 90) -> int:
        """Send SIGTERM (graceful stop), wait for the exit and return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_seconds)


class CountingStorageSCP:
    """A pynetdicom storage SCP for SRs that counts how often each SOP Instance UID arrives."""

    def __init__(self, ae_title: str = "COUNTER", port: int | None = None, status: int = 0x0000) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self.status = status
        self.received: Counter[str] = Counter()
        self.studies: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server = None

    def start(self) -> CountingStorageSCP:
        """Start listening on 127.0.0.1 and return self."""
        ae = AE(ae_title=self.ae_title)
        for sop_class in (EnhancedSRStorage, ComprehensiveSRStorage, BasicTextSRStorage):
            ae.add_supported_context(sop_class)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def _on_store(self, event) -> int:
        dataset = event.dataset
        with self._lock:
            self.received[str(dataset.SOPInstanceUID)] += 1
            self.studies[str(dataset.SOPInstanceUID)] = str(dataset.StudyInstanceUID)
        return self.status

    def destination(self, name: str = "counter", **extra) -> dict:
        """Return a [[destinations]] entry for this SCP."""
        return {"name": name, "ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port} | extra

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def process_document(data_dir: Path, model_path: Path, database_url: str = "", **sections) -> dict:
    """Return a configuration document for a node process on a free loopback port (JSON logs)."""
    document = {
        "node": {
            "ae_title": "LIBRA_NODE",
            "bind_address": "127.0.0.1",
            "port": free_port(),
            "data_dir": str(data_dir),
            "database_url": database_url,
            "study_stable_seconds": 1.0,
            "stability_check_seconds": 0.2,
            "free_disk_reserve_mb": 0,
        },
        "model": {"path": str(model_path), "max_new_tokens": 8},
        "worker": {"poll_seconds": 0.2},
        "logging": {"format": "json"},
        # Several node processes run at once, so each admin endpoint takes any free port.
        "admin": {"port": 0},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(document.get(section), dict):
            document[section] = document[section] | values
        else:
            document[section] = values
    return document
