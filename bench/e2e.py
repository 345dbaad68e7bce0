"""End-to-end benchmark: from the last image's C-STORE response to the draft SR's arrival at PACS.

The script starts a storage SCP of its own as the PACS (pynetdicom, in this process, recording
when each SR association is requested and when each SR's C-STORE gets its response) and a node as
deployed (`libra-node run` with its worker and the tiny random checkpoint unless `--model-path`
is given). For each synthetic patient it sends a prior study and waits for its SR, then sends
the current study (PA and lateral) and waits for that SR, with pynetdicom as the modality. The
node's JSON log gives the time of each stage. Every time is read from one clock, the machine's.

The figure of merit is the total minus the configured stable wait and minus the model's own
time (vision, prefill, decode), which the node cannot shorten by scheduling.

Run from the repository root:

    .venv/bin/python -m bench.e2e                          # 5 patients, tiny model
    .venv/bin/python -m bench.e2e --patients 10 --json out.json --plot docs/img/e2e_latency.png
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import BasicTextSRStorage, ComprehensiveSRStorage, EnhancedSRStorage

from bench.instances import write_instances
from bench.servers import MODALITY_AE_TITLE, NODE_AE_TITLE, REPO_ROOT, free_port, read_memory_kib, start_node

PACS_AE_TITLE = "BENCH_PACS"
SR_TIMEOUT_SECONDS = 600.0
TARGET_SECONDS = 1.0
# Stage names in timeline order; the plot and the table use them.
COMPONENTS = (
    ("receive_tail", "last index commit, relative to its response"),
    ("stability_timer", "stability timer after the deadline"),
    ("job_claim", "job claim"),
    ("input_loading", "inputs resolved and images read"),
    ("vision", "model: vision and connector"),
    ("prefill", "model: prefill"),
    ("decode", "model: decode"),
    ("sr_build", "SR built and written"),
    ("outbox_to_send", "outbox entry to association request"),
    ("send", "association and C-STORE to PACS"),
)
MODEL_COMPONENTS = ("vision", "prefill", "decode")


@dataclass
class StudyTimes:
    """The stage times of one study, in seconds, plus the figure of merit."""

    patient: int
    case: str
    study_instance_uid: str
    total: float
    stable_wait: float
    model: float
    overhead: float
    components: dict[str, float]


class RecordingPacs:
    """A pynetdicom storage SCP for SRs that records association and C-STORE times by Study Instance UID."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.port = free_port()
        self.received: dict[str, dict[str, float]] = {}
        self._requested_at: dict[int, float] = {}
        self._condition = threading.Condition()
        self._server = None

    def start(self) -> "RecordingPacs":
        """Listen on 127.0.0.1 in background threads."""
        ae = AE(ae_title=PACS_AE_TITLE)
        for sop_class in (EnhancedSRStorage, ComprehensiveSRStorage, BasicTextSRStorage):
            ae.add_supported_context(sop_class, ExplicitVRLittleEndian)
        handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_c_store)]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        """Close the listener."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_requested(self, event: evt.Event) -> None:
        self._requested_at[id(event.assoc)] = time.time()

    def _on_c_store(self, event: evt.Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        self.output_dir.mkdir(parents=True, exist_ok=True)
        dataset.save_as(self.output_dir / f"{dataset.SOPInstanceUID}.dcm", enforce_file_format=True)
        answered_at = time.time()
        with self._condition:
            self.received[str(dataset.StudyInstanceUID)] = {
                "association_requested": self._requested_at.get(id(event.assoc), answered_at),
                "answered": answered_at,
            }
            self._condition.notify_all()
        return 0x0000

    def wait_for(self, study_instance_uid: str, timeout_seconds: float) -> dict[str, float]:
        """Block until the SR of a study arrived; return its times, or raise TimeoutError."""
        deadline = time.monotonic() + timeout_seconds
        with self._condition:
            while study_instance_uid not in self.received:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no SR for study {study_instance_uid} after {timeout_seconds} s")
                self._condition.wait(remaining)
            return self.received[study_instance_uid]


def send_study(port: int, paths: list[Path]) -> float:
    """Send files over one association with pynetdicom; return the time of the last C-STORE response.

    Raises
    ------
    RuntimeError
        When the association fails or a C-STORE does not succeed.
    """
    datasets = [pydicom.dcmread(path) for path in paths]
    ae = AE(ae_title=MODALITY_AE_TITLE)
    for dataset in datasets:
        ae.add_requested_context(dataset.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE_TITLE)
    if not assoc.is_established:
        raise RuntimeError("the node did not accept the association")
    try:
        last_response_at = 0.0
        for dataset in datasets:
            response = assoc.send_c_store(dataset)
            last_response_at = time.time()
            status = int(response.Status) if "Status" in response else None
            if status != 0:
                raise RuntimeError(f"C-STORE of {dataset.SOPInstanceUID} answered {status}")
    finally:
        assoc.release()
    return last_response_at


def log_time(entry: dict) -> float:
    """Return a node log line's timestamp as seconds since the epoch."""
    return dt.datetime.fromisoformat(entry["timestamp"]).timestamp()


def study_times(
    events: list[dict], pacs_times: dict[str, float], study_instance_uid: str, last_response_at: float,
    stable_seconds: float, patient: int, case: str,
) -> StudyTimes:
    """Split one study's end-to-end time into its stages from the node's log lines.

    Raises
    ------
    LookupError
        When a stage's log line is missing.
    """
    mine = [entry for entry in events if entry.get("study_instance_uid") == study_instance_uid]

    def last(event_name: str) -> dict:
        matching = [entry for entry in mine if entry.get("event") == event_name]
        if not matching:
            raise LookupError(f"the node logged no {event_name} for study {study_instance_uid}")
        return matching[-1]

    stored_at = log_time(last("receiver.instance_stored"))
    queued_at = log_time(last("study.queued"))
    claimed_at = log_time(last("worker.job_claimed"))
    generated = last("worker.report_generated")
    generated_at = log_time(generated)
    written_at = log_time(last("worker.sr_written"))
    model_seconds = float(generated["model_seconds"])
    components = {
        "receive_tail": stored_at - last_response_at,
        "stability_timer": queued_at - (stored_at + stable_seconds),
        "job_claim": claimed_at - queued_at,
        "input_loading": (generated_at - model_seconds) - claimed_at,
        "vision": float(generated["vision_seconds"]),
        "prefill": float(generated["prefill_seconds"]),
        "decode": float(generated["decode_seconds"]),
        "sr_build": written_at - generated_at,
        "outbox_to_send": pacs_times["association_requested"] - written_at,
        "send": pacs_times["answered"] - pacs_times["association_requested"],
    }
    total = pacs_times["answered"] - last_response_at
    return StudyTimes(
        patient=patient,
        case=case,
        study_instance_uid=study_instance_uid,
        total=total,
        stable_wait=stable_seconds,
        model=model_seconds,
        overhead=total - stable_seconds - model_seconds,
        components=components,
    )


def print_study(times: StudyTimes) -> None:
    """Print one study's stages in milliseconds."""
    parts = "  ".join(f"{name} {times.components[name] * 1000:.0f}" for name, _ in COMPONENTS)
    print(
        f"patient {times.patient} {times.case:<10} total {times.total:6.2f} s = stable {times.stable_wait:.2f} + "
        f"model {times.model:5.2f} + other {times.overhead * 1000:5.0f} ms   [ms: {parts}]",
        flush=True,
    )


def summarize(results: list[StudyTimes]) -> dict:
    """Print the median of every stage per case and the target; return them."""
    summary = {}
    print("\nMedian per case, milliseconds:")
    for case in sorted({result.case for result in results}):
        selected = [result for result in results if result.case == case]
        medians = {name: statistics.median(result.components[name] for result in selected) for name, _ in COMPONENTS}
        overhead = statistics.median(result.overhead for result in selected)
        total = statistics.median(result.total for result in selected)
        summary[case] = {"components": medians, "overhead": overhead, "total": total, "studies": len(selected)}
        print(f"  {case} ({len(selected)} studies): total {total:.2f} s, total - stable wait - model {overhead * 1000:.0f} ms")
        for name, label in COMPONENTS:
            print(f"    {label:<40} {medians[name] * 1000:8.1f}")
    worst = max(result.overhead for result in results)
    verdict = "met" if worst < TARGET_SECONDS else f"missed by {(worst - TARGET_SECONDS) * 1000:.0f} ms"
    print(f"\nTarget: total - stable wait - model < {TARGET_SECONDS:.0f} s for every study: worst {worst * 1000:.0f} ms, {verdict}")
    summary["worst_overhead"] = worst
    return summary


def plot_components(summary: dict, path: Path, title: str) -> None:
    """Draw the median stages of each case as one stacked horizontal bar (stable wait left out)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    cases = [case for case in summary if isinstance(summary[case], dict) and "components" in summary[case]]
    figure, axes = pyplot.subplots(figsize=(8.0, 1.6 + 0.7 * len(cases)), dpi=120)
    colors = pyplot.get_cmap("tab10").colors
    for row, case in enumerate(cases):
        left = 0.0
        for index, (name, label) in enumerate(COMPONENTS):
            width = max(summary[case]["components"][name], 0.0)
            axes.barh(row, width, left=left, color=colors[index % len(colors)], label=label if row == 0 else None)
            left += width
    axes.set_yticks(range(len(cases)), cases)
    axes.set_xlabel("seconds (median; the configured stable wait is left out)")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3)
    axes.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    pyplot.close(figure)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=5, help="patients, each with a prior and a current study (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=2500, help="image rows in pixels (default: %(default)s)")
    parser.add_argument("--columns", type=int, default=2000, help="image columns in pixels (default: %(default)s)")
    parser.add_argument("--stable-seconds", type=float, default=2.0, help="node.study_stable_seconds (default: %(default)s)")
    parser.add_argument(
        "--check-seconds", type=float, default=0.5, help="node.stability_check_seconds (default: %(default)s, the shipped value)"
    )
    parser.add_argument("--poll-seconds", type=float, default=0.5, help="worker.poll_seconds (default: %(default)s, the shipped value)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="model.max_new_tokens (default: %(default)s)")
    parser.add_argument("--model-path", default="", help="Libra checkpoint folder (default: the tiny random checkpoint)")
    parser.add_argument("--vision-tower-path", default="", help="RAD-DINO folder for --model-path")
    parser.add_argument("--device", default="auto", help="model.device: auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument(
        "--checkout", type=Path, default=REPO_ROOT, help="repository whose node runs, for before/after figures (default: this one)"
    )
    parser.add_argument("--work-dir", type=Path, help="folder for files and servers (default: a new temporary folder, removed at the end)")
    parser.add_argument("--json", type=Path, help="write every study's stages and the medians to this JSON file")
    parser.add_argument("--plot", type=Path, help="draw the median stages into this PNG file (needs matplotlib)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and return 0 when every SR arrived."""
    arguments = parse_arguments(argv)
    work_dir = arguments.work_dir or Path(tempfile.mkdtemp(prefix="libra-bench-e2e-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    pacs = RecordingPacs(work_dir / "pacs").start()
    node = None
    try:
        node = start_node(
            work_dir,
            "node",
            run_worker=True,
            checkout=arguments.checkout.resolve(),
            node={
                "study_stable_seconds": arguments.stable_seconds,
                "stability_check_seconds": arguments.check_seconds,
                "free_disk_reserve_mb": 0,
            },
            worker={"poll_seconds": arguments.poll_seconds},
            model={
                "path": arguments.model_path,
                "vision_tower_path": arguments.vision_tower_path,
                "max_new_tokens": arguments.max_new_tokens,
                "device": arguments.device,
            },
            destinations=[{"name": "pacs", "ae_title": PACS_AE_TITLE, "host": "127.0.0.1", "port": pacs.port}],
        )
        deadline = time.monotonic() + SR_TIMEOUT_SECONDS
        while not any(entry.get("event") == "worker.model_loaded" for entry in node.log_events()):
            if time.monotonic() > deadline or node.process.poll() is not None:
                raise RuntimeError(f"the node's worker did not load the model; see {node.log_path}")
            time.sleep(0.1)
        memory = {"model_loaded_idle_kib": read_memory_kib(node.pid)["VmRSS"]}
        print(f"Node ready with its model loaded: {memory['model_loaded_idle_kib'] / 1024:.0f} MiB resident\n", flush=True)

        results: list[StudyTimes] = []
        for patient in range(1, arguments.patients + 1):
            files = write_instances(
                work_dir / f"patient{patient}", 4, arguments.rows, arguments.columns, first_patient=2 * patient - 1
            )
            # write_instances gives each pair its own patient; the current study takes the prior's.
            _same_patient(files)
            for case, paths in (("no prior", files[:2]), ("with prior", files[2:])):
                study_instance_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
                last_response_at = send_study(node.port, paths)
                pacs_times = pacs.wait_for(study_instance_uid, SR_TIMEOUT_SECONDS)
                times = study_times(
                    node.log_events(), pacs_times, study_instance_uid, last_response_at,
                    arguments.stable_seconds, patient, case,
                )
                results.append(times)
                print_study(times)
        memory["end_hwm_kib"] = read_memory_kib(node.pid)["VmHWM"]
        summary = summarize(results)
        print(f"\nNode memory: {memory['model_loaded_idle_kib'] / 1024:.0f} MiB idle with the model, VmHWM {memory['end_hwm_kib'] / 1024:.0f} MiB")
        if arguments.plot:
            model_name = Path(arguments.model_path).name if arguments.model_path else "tiny random checkpoint"
            title = (
                f"{model_name}, {arguments.rows} x {arguments.columns} CR, stable wait {arguments.stable_seconds:g} s, "
                f"stability check {arguments.check_seconds:g} s, worker poll {arguments.poll_seconds:g} s"
            )
            plot_components(summary, arguments.plot, title)
            print(f"Plot written to {arguments.plot}")
        if arguments.json:
            document = {
                "arguments": {key: str(value) if isinstance(value, Path) else value for key, value in vars(arguments).items()},
                "studies": [asdict(result) for result in results],
                "summary": summary,
                "memory": memory,
            }
            arguments.json.parent.mkdir(parents=True, exist_ok=True)
            arguments.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        return 0
    finally:
        if node is not None:
            node.stop()
        pacs.stop()
        if arguments.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)


def _same_patient(files: list[Path]) -> None:
    """Give the second study the first study's patient and a later Study Date, so the first is its prior."""
    prior = pydicom.dcmread(files[0], stop_before_pixels=True)
    later_date = (dt.datetime.strptime(prior.StudyDate, "%Y%m%d") + dt.timedelta(days=30)).strftime("%Y%m%d")
    for path in files[2:]:
        dataset = pydicom.dcmread(path)
        dataset.PatientID = prior.PatientID
        dataset.PatientName = prior.PatientName
        dataset.StudyDate = later_date
        dataset.save_as(path, enforce_file_format=True)


if __name__ == "__main__":
    sys.exit(main())
