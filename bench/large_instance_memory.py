"""Peak memory of a receiving node while it stores one large instance.

Starts `libra-node run --no-worker` on a free loopback port, resets the process's peak
resident set size once it is idle (Linux /proc/PID/clear_refs), sends one uncompressed
instance of about the requested size with dcmtk's dcmsend, and reads the peak again.
The report job is not run, so the numbers cover receiving, storing and indexing only.

    python -m bench.large_instance_memory --megabytes 200
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian

from node.synthetic import synthetic_chest_study
from tests.peers import free_port, wait_for_port

NODE_AE_TITLE = "LIBRA_NODE"
MODALITY_AE_TITLE = "MODALITY1"


@dataclass(frozen=True)
class MemoryMeasurement:
    """Resident memory of the node process, in MiB, and the instance it received."""

    instance_mib: float
    idle_rss_mib: float
    idle_peak_mib: float
    receive_peak_mib: float
    peak_growth_mib: float
    peak_was_reset: bool
    send_seconds: float


def write_large_instance(path: Path, instance_bytes: int) -> Path:
    """Write a 16-bit uncompressed CR image of about `instance_bytes` bytes of pixel data."""
    side = int(math.sqrt(instance_bytes / 2))
    dataset = synthetic_chest_study(size=64)
    pixels = np.zeros((side, side), dtype=np.uint16)
    pixels[:, : side // 2] = 1000
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.PixelData = pixels.tobytes()
    del pixels
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.save_as(path, enforce_file_format=True)
    return path


def read_memory_kib(pid: int) -> dict[str, int]:
    """Return VmRSS and VmHWM (peak resident set size) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def reset_peak(pid: int) -> bool:
    """Reset the process's peak resident set size to its current one; False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def write_node_config(folder: Path, port: int) -> Path:
    """Write the TOML configuration of a receiving-only node; return its path."""
    config_path = folder / "node.toml"
    config_path.write_text(
        f"""[node]
ae_title = "{NODE_AE_TITLE}"
bind_address = "127.0.0.1"
port = {port}
data_dir = "{folder / 'node'}"
study_stable_seconds = 3600
free_disk_reserve_mb = 0

[[callers]]
ae_title = "{MODALITY_AE_TITLE}"

[worker]
enabled = false

[admin]
port = 0

[logging]
level = "warning"
"""
    )
    return config_path


def measure_large_instance(workdir: Path, instance_bytes: int) -> MemoryMeasurement:
    """Run a node, send it one instance of about `instance_bytes`, and return its memory."""
    instance_path = write_large_instance(workdir / "large.dcm", instance_bytes)
    port = free_port()
    config_path = write_node_config(workdir, port)
    with (workdir / "node.log").open("wb") as log_file:
        node = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "run", "--no-worker", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, timeout_seconds=120)
        # Let start-up allocations settle before the idle reading.
        time.sleep(2)
        idle = read_memory_kib(node.pid)
        peak_was_reset = reset_peak(node.pid)
        started = time.monotonic()
        result = subprocess.run(
            ["dcmsend", "127.0.0.1", str(port), str(instance_path), "-aet", MODALITY_AE_TITLE, "-aec", NODE_AE_TITLE],
            capture_output=True,
            text=True,
            timeout=600,
        )
        send_seconds = time.monotonic() - started
        if result.returncode != 0:
            raise RuntimeError(f"dcmsend failed: {result.stderr}")
        after = read_memory_kib(node.pid)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=120)
    baseline_kib = idle["VmRSS"] if peak_was_reset else idle["VmHWM"]
    return MemoryMeasurement(
        instance_mib=round(instance_path.stat().st_size / 2**20, 1),
        idle_rss_mib=round(idle["VmRSS"] / 1024, 1),
        idle_peak_mib=round(idle["VmHWM"] / 1024, 1),
        receive_peak_mib=round(after["VmHWM"] / 1024, 1),
        peak_growth_mib=round((after["VmHWM"] - baseline_kib) / 1024, 1),
        peak_was_reset=peak_was_reset,
        send_seconds=round(send_seconds, 2),
    )


def main(argv: list[str] | None = None) -> int:
    """Print the measurement for one instance as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=200.0, help="pixel data size in MB (default: %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="libra-large-instance-") as folder:
        measurement = measure_large_instance(Path(folder), int(args.megabytes * 1_000_000))
    print(json.dumps(asdict(measurement), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
