"""Ingest benchmark: C-STORE throughput of the node against pynetdicom's and dcmtk's storescp.

The script writes N chest-sized uncompressed CR instances. In each round it starts every
server on a free loopback port: a fresh `libra-node run --no-worker` with a new data folder,
pynetdicom's storescp app, dcmtk's storescp, and dcmtk's storescp --fork. It sends the same
files to each with dcmtk's storescu, one process per association, each with a disjoint part
of the files. The servers take turns, and the order rotates every round. Images/s and MB/s
count from the start of the storescu processes to their exit, after every server-side file
was checked to be there.

Run from the repository root:

    .venv/bin/python -m bench.ingest                      # default: 40 files, 5 rounds, 1 and 4 associations
    .venv/bin/python -m bench.ingest --count 64 --rounds 5 --json out.json --plot docs/img/ingest_rate.png
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.instances import write_instances
from bench.servers import (
    BASELINE_AE_TITLE,
    MODALITY_AE_TITLE,
    NODE_AE_TITLE,
    REPO_ROOT,
    NodeProcess,
    ServerProcess,
    dcmtk_storescp,
    dcmtk_tool,
    pynetdicom_storescp,
    read_cpu_seconds,
    read_machine_busy_seconds,
    read_memory_kib,
    start_node,
)

BASELINES = ("pynetdicom", "dcmtk", "dcmtk-fork")
SEND_TIMEOUT_SECONDS = 600.0
MEMORY_SAMPLE_SECONDS = 0.05
# Targets of the ingest path: the node's rate over each baseline's at one association, and the
# node's rate at four associations over its own rate at one.
TARGET_RATIO_PYNETDICOM = 1.0
TARGET_RATIO_DCMTK = 1.3
TARGET_SCALING_FOUR = 1.5


@dataclass
class SendRun:
    """One server receiving all files at one concurrency."""

    round: int
    server: str
    concurrency: int
    seconds: float
    images: int
    received: int
    total_bytes: int
    server_cpu_seconds: float
    sender_cpu_seconds: float
    machine_busy_seconds: float
    error: str = ""

    @property
    def ok(self) -> bool:
        """Whether every file arrived and every storescu exited with status 0."""
        return not self.error

    @property
    def images_per_second(self) -> float:
        """Images received per second of wall time."""
        return self.images / self.seconds

    @property
    def megabytes_per_second(self) -> float:
        """File bytes received per second, in MB (10^6 bytes)."""
        return self.total_bytes / self.seconds / 1e6

    @property
    def other_cores(self) -> float:
        """Cores busy outside the server process and the senders (other processes, kernel writeback, unreaped children), averaged over the run."""
        return max(0.0, self.machine_busy_seconds - self.server_cpu_seconds - self.sender_cpu_seconds) / self.seconds


class MemorySampler:
    """Sample a process's VmRSS every 50 ms in a thread; `peak_kib` is the largest sample."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kib = max(self.peak_kib, read_memory_kib(self.pid)["VmRSS"])
            except (OSError, KeyError):
                return
            self._stop.wait(MEMORY_SAMPLE_SECONDS)


def split_files(files: list[Path], parts: int, folder: Path) -> list[Path]:
    """Hard-link the files into `parts` disjoint subfolders (round robin) and return the subfolders."""
    folders = [folder / f"part{index}" for index in range(parts)]
    for part_folder in folders:
        part_folder.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(files):
        target = folders[index % parts] / path.name
        if not target.exists():
            target.hardlink_to(path)
    return folders


def send_folders(port: int, called_ae_title: str, folders: list[Path]) -> tuple[float, list[int], str, float]:
    """Run one dcmtk storescu per folder at the same time.

    Returns the wall seconds, the exit statuses, the stderr tail of failed senders and their CPU seconds.
    """
    commands = [
        [dcmtk_tool("storescu"), "-aet", MODALITY_AE_TITLE, "-aec", called_ae_title, "--required", "--scan-directories",
         "127.0.0.1", str(port), str(folder)]
        for folder in folders
    ]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for command in commands]
    outputs = []
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=SEND_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        outputs.append(stderr.decode(errors="replace"))
    seconds = time.perf_counter() - started
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    sender_cpu_seconds = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    statuses = [process.returncode for process in processes]
    failed_output = "\n".join(output for output, status in zip(outputs, statuses) if status != 0)
    return seconds, statuses, failed_output[-800:], sender_cpu_seconds


def start_server(name: str, work_dir: Path, label: str, before_checkout: Path | None) -> ServerProcess:
    """Start the node (this checkout's, or `before_checkout`'s for "node-before") or a baseline SCP."""
    if name in ("node", "node-before"):
        checkout = before_checkout if name == "node-before" else REPO_ROOT
        return start_node(work_dir, label, run_worker=False, checkout=checkout, worker={"enabled": False})
    if name == "pynetdicom":
        return pynetdicom_storescp(work_dir, label).start()
    return dcmtk_storescp(work_dir, label, fork=name == "dcmtk-fork").start()


def measure(
    name: str,
    round_number: int,
    concurrency: int,
    folders: list[Path],
    expected: int,
    total_bytes: int,
    work_dir: Path,
    before_checkout: Path | None,
) -> tuple[SendRun, dict]:
    """Start one server, send every file to it, check what arrived, stop it; return the run and memory figures."""
    label = f"r{round_number}-c{concurrency}-{name}"
    server = start_server(name, work_dir, label, before_checkout)
    memory: dict[str, int] = {}
    try:
        is_node = isinstance(server, NodeProcess)
        called_ae_title = NODE_AE_TITLE if is_node else BASELINE_AE_TITLE
        if is_node and name == "node":
            memory["idle_rss_kib"] = read_memory_kib(server.pid)["VmRSS"]
        server_cpu_before = read_cpu_seconds(server.pid)
        machine_busy_before = read_machine_busy_seconds()
        with MemorySampler(server.pid) as sampler:
            seconds, statuses, errors, sender_cpu_seconds = send_folders(server.port, called_ae_title, folders)
        machine_busy_seconds = read_machine_busy_seconds() - machine_busy_before
        server_cpu_seconds = read_cpu_seconds(server.pid) - server_cpu_before
        if is_node and name == "node":
            memory["receiving_peak_rss_kib"] = sampler.peak_kib
            memory["hwm_kib"] = read_memory_kib(server.pid)["VmHWM"]
        received = server.received_files()
    finally:
        server.stop()
        shutil.rmtree(server.output_dir, ignore_errors=True)
    error = ""
    if any(statuses):
        error = f"storescu exit statuses {statuses}: {errors.strip()}"
    elif received != expected:
        error = f"{received} of {expected} files arrived; see {server.log_path}"
    run = SendRun(
        round_number, name, concurrency, seconds, expected, received, total_bytes,
        server_cpu_seconds, sender_cpu_seconds, machine_busy_seconds, error,
    )
    return run, memory


def median_rate(runs: list[SendRun], server: str, concurrency: int) -> tuple[float, float] | None:
    """Return the median (images/s, MB/s) of the good runs of one server at one concurrency."""
    selected = [run for run in runs if run.server == server and run.concurrency == concurrency and run.ok]
    if not selected:
        return None
    return (
        statistics.median(run.images_per_second for run in selected),
        statistics.median(run.megabytes_per_second for run in selected),
    )


def round_ratios(runs: list[SendRun], baselines: list[str], concurrencies: list[int]) -> list[dict]:
    """Return node/baseline rate ratios per round and concurrency, and the node's scaling per round."""
    by_key = {(run.round, run.server, run.concurrency): run for run in runs if run.ok}
    rounds = sorted({run.round for run in runs})
    ratios = []
    for round_number in rounds:
        for concurrency in concurrencies:
            node_run = by_key.get((round_number, "node", concurrency))
            for baseline in baselines:
                baseline_run = by_key.get((round_number, baseline, concurrency))
                if node_run and baseline_run:
                    ratios.append({
                        "round": round_number,
                        "concurrency": concurrency,
                        "baseline": baseline,
                        "ratio": node_run.images_per_second / baseline_run.images_per_second,
                    })
        if 1 in concurrencies:
            single = by_key.get((round_number, "node", 1))
            for concurrency in concurrencies:
                multiple = by_key.get((round_number, "node", concurrency))
                if concurrency != 1 and single and multiple:
                    ratios.append({
                        "round": round_number,
                        "concurrency": concurrency,
                        "baseline": "node at 1 association",
                        "ratio": multiple.images_per_second / single.images_per_second,
                    })
    return ratios


def median_ratio(ratios: list[dict], baseline: str, concurrency: int) -> float | None:
    """Return the median over rounds of one ratio, or None when no round has it."""
    values = [entry["ratio"] for entry in ratios if entry["baseline"] == baseline and entry["concurrency"] == concurrency]
    return statistics.median(values) if values else None


def print_run(run: SendRun) -> None:
    """Print one run as a table row."""
    status = "ok" if run.ok else f"FAILED: {run.error}"
    print(
        f"round {run.round}  {run.server:<11} x{run.concurrency}  {run.seconds:6.2f} s  "
        f"{run.images_per_second:6.2f} images/s  {run.megabytes_per_second:6.1f} MB/s  "
        f"CPU ms/image: server {run.server_cpu_seconds / run.images * 1000:5.1f}, "
        f"storescu {run.sender_cpu_seconds / run.images * 1000:4.1f}; rest of machine {run.other_cores:.2f} cores  {status}",
        flush=True,
    )


def summarize(runs: list[SendRun], ratios: list[dict], servers: list[str], concurrencies: list[int]) -> dict:
    """Print the medians, ratios and targets; return them as a dictionary."""
    print("\nMedian over rounds (images/s, MB/s):")
    medians = {}
    for server in servers:
        for concurrency in concurrencies:
            rate = median_rate(runs, server, concurrency)
            if rate is not None:
                medians[f"{server}@{concurrency}"] = {"images_per_second": rate[0], "megabytes_per_second": rate[1]}
                print(f"  {server:<11} x{concurrency}  {rate[0]:7.2f} images/s  {rate[1]:7.1f} MB/s")

    print("\nRatios, node over the baseline in the same round (per round, then median):")
    median_ratios = {}
    for baseline in [*servers[1:], "node at 1 association"]:
        for concurrency in concurrencies:
            values = [entry["ratio"] for entry in ratios if entry["baseline"] == baseline and entry["concurrency"] == concurrency]
            if not values:
                continue
            median_value = statistics.median(values)
            median_ratios[f"{baseline}@{concurrency}"] = median_value
            rounds_text = " ".join(f"{value:.2f}" for value in values)
            print(f"  x{concurrency} node / {baseline:<22} rounds: {rounds_text}   median {median_value:.2f}")

    targets = []
    for baseline, concurrency, target in (
        ("pynetdicom", 1, TARGET_RATIO_PYNETDICOM),
        ("dcmtk", 1, TARGET_RATIO_DCMTK),
        ("node at 1 association", 4, TARGET_SCALING_FOUR),
    ):
        value = median_ratio(ratios, baseline, concurrency)
        if value is None:
            continue
        met = value >= target
        targets.append({"baseline": baseline, "concurrency": concurrency, "target": target, "median": value, "met": met})
    if targets:
        print("\nTargets:")
        for target in targets:
            verdict = "met" if target["met"] else f"missed by {(1 - target['median'] / target['target']) * 100:.0f} %"
            print(
                f"  node x{target['concurrency']} / {target['baseline']} >= {target['target']:.1f}: "
                f"median {target['median']:.2f}, {verdict}"
            )
    return {"medians": medians, "median_ratios": median_ratios, "targets": targets}


def plot_rates(runs: list[SendRun], servers: list[str], concurrencies: list[int], path: Path, title: str) -> None:
    """Draw median images/s against associations per server, with the rounds' range as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6.4, 4.0), dpi=120)
    for server in servers:
        medians, lower, upper, used = [], [], [], []
        for concurrency in concurrencies:
            values = [run.images_per_second for run in runs if run.server == server and run.concurrency == concurrency and run.ok]
            if not values:
                continue
            median_value = statistics.median(values)
            used.append(concurrency)
            medians.append(median_value)
            lower.append(median_value - min(values))
            upper.append(max(values) - median_value)
        if used:
            axes.errorbar(used, medians, yerr=[lower, upper], marker="o", capsize=4, label=server)
    axes.set_xlabel("concurrent associations (one storescu each)")
    axes.set_ylabel("images/s (median, bars: min to max)")
    axes.set_xticks(concurrencies)
    axes.set_ylim(bottom=0)
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    pyplot.close(figure)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=40, help="instances sent to each server per run (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=2500, help="image rows in pixels (default: %(default)s)")
    parser.add_argument("--columns", type=int, default=2000, help="image columns in pixels (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all servers (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="associations at once (default: 1 4)")
    parser.add_argument(
        "--baselines", nargs="*", choices=BASELINES, default=list(BASELINES), help="baseline SCPs (default: all three)"
    )
    parser.add_argument(
        "--before-checkout",
        type=Path,
        help="also measure the node of this repository checkout as 'node-before', for before/after ratios in one run",
    )
    parser.add_argument("--work-dir", type=Path, help="folder for files and servers (default: a new temporary folder, removed at the end)")
    parser.add_argument("--json", type=Path, help="write every run, the medians and the ratios to this JSON file")
    parser.add_argument("--plot", type=Path, help="draw images/s against associations into this PNG file (needs matplotlib)")
    arguments = parser.parse_args(argv)
    if arguments.count < max(arguments.concurrency):
        parser.error(f"--count {arguments.count} is below the largest --concurrency; send at least one file per association")
    return arguments


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and return 0 when every run received every file."""
    arguments = parse_arguments(argv)
    work_dir = arguments.work_dir or Path(tempfile.mkdtemp(prefix="libra-bench-ingest-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    servers = ["node", *(["node-before"] if arguments.before_checkout else []), *arguments.baselines]
    try:
        print(f"Writing {arguments.count} instances of {arguments.rows} x {arguments.columns} pixels to {work_dir}", flush=True)
        files = write_instances(work_dir / "instances", arguments.count, arguments.rows, arguments.columns)
        total_bytes = sum(path.stat().st_size for path in files)
        print(f"{total_bytes / 1e6:.0f} MB in all, {total_bytes / len(files) / 1e6:.1f} MB per file\n", flush=True)
        parts = {concurrency: split_files(files, concurrency, work_dir / f"parts-{concurrency}") for concurrency in arguments.concurrency}

        runs: list[SendRun] = []
        memory_samples: list[dict] = []
        for round_number in range(1, arguments.rounds + 1):
            shift = (round_number - 1) % len(servers)
            order = servers[shift:] + servers[:shift]
            for concurrency in arguments.concurrency:
                for name in order:
                    run, memory = measure(
                        name, round_number, concurrency, parts[concurrency], len(files), total_bytes, work_dir,
                        arguments.before_checkout.resolve() if arguments.before_checkout else None,
                    )
                    runs.append(run)
                    if memory:
                        memory_samples.append(memory | {"round": round_number, "concurrency": concurrency})
                    print_run(run)

        ratios = round_ratios(runs, servers[1:], arguments.concurrency)
        summary = summarize(runs, ratios, servers, arguments.concurrency)
        if memory_samples:
            print("\nNode resident memory (MiB): idle after start, peak while receiving, VmHWM at the end:")
            for sample in memory_samples:
                print(
                    f"  round {sample['round']} x{sample['concurrency']}: idle {sample['idle_rss_kib'] / 1024:.0f}, "
                    f"receiving {sample['receiving_peak_rss_kib'] / 1024:.0f}, VmHWM {sample['hwm_kib'] / 1024:.0f}"
                )
        if arguments.plot:
            title = f"{arguments.count} files of {total_bytes / len(files) / 1e6:.0f} MB, {arguments.rounds} rounds"
            plot_rates(runs, servers, arguments.concurrency, arguments.plot, title)
            print(f"\nPlot written to {arguments.plot}")
        if arguments.json:
            document = {
                "arguments": {key: str(value) if isinstance(value, Path) else value for key, value in vars(arguments).items()},
                "file_bytes": total_bytes,
                "runs": [
                    asdict(run)
                    | {
                        "images_per_second": run.images_per_second,
                        "megabytes_per_second": run.megabytes_per_second,
                        "other_cores": run.other_cores,
                    }
                    for run in runs
                ],
                "ratios": ratios,
                "memory": memory_samples,
                **summary,
            }
            arguments.json.parent.mkdir(parents=True, exist_ok=True)
            arguments.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        return 0 if all(run.ok for run in runs) else 1
    finally:
        if arguments.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
