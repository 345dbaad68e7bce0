"""Report-job throughput with 1 and with 3 worker processes on one PostgreSQL index.

A receiver process (`libra-node run --no-worker`) and N `libra-node worker` processes share a
fresh PostgreSQL database and store; the script sends S synthetic studies and measures the time
from the last C-STORE response to the last SR received by a pynetdicom storage SCP. Both worker
counts are measured in the same run, alternating over several rounds, and the ratio is printed.

    .venv/bin/python bench/worker_throughput.py [--studies 30] [--rounds 2] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libra_model.tiny import build_tiny_checkpoint  # noqa: E402
from node.send_tool import send_datasets  # noqa: E402
from node.synthetic import synthetic_chest_study  # noqa: E402
from tests.node.processes import CountingStorageSCP, NodeProcess, process_document  # noqa: E402
from tests.peers import postgres_database  # noqa: E402


def measure(worker_count: int, studies: int, max_new_tokens: int, checkpoint: Path, workdir: Path) -> float:
    """Return studies per second for one round with `worker_count` workers."""
    counter = CountingStorageSCP().start()
    processes: list[NodeProcess] = []
    try:
        with postgres_database() as url:
            sections = {
                "destinations": [counter.destination()],
                "model": {"path": str(checkpoint), "max_new_tokens": max_new_tokens},
            }
            store = workdir / "store"
            receiver = NodeProcess(workdir, "receiver", process_document(store, checkpoint, url, **sections), extra_args=("--no-worker",))
            workers = [
                NodeProcess(workdir, f"worker{number}", process_document(store, checkpoint, url, **sections), command="worker")
                for number in range(worker_count)
            ]
            processes = [receiver, *workers]
            for process in processes:
                process.wait_ready()
            for worker in workers:
                worker.wait_for_event("worker.model_loaded")
            datasets = [
                synthetic_chest_study(patient_id=f"BENCH-{number:03d}", study_date=dt.date(2026, 1, 1), seed=number, size=256)
                for number in range(studies)
            ]
            send_datasets("LIBRA_NODE", "127.0.0.1", receiver.port, datasets, "MODALITY1")
            last_ack = time.monotonic()
            while len(counter.received) < studies:
                if time.monotonic() - last_ack > 600:
                    raise TimeoutError(f"only {len(counter.received)} of {studies} SRs after 600 s")
                time.sleep(0.05)
            elapsed = time.monotonic() - last_ack
    finally:
        for process in processes:
            process.terminate()
        counter.stop()
    # The stable wait (1 s in process_document) is the same for both worker counts.
    return studies / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=30, help="studies per round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per worker count (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens each report generates (default: %(default)s)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="libra-bench-") as folder:
        checkpoint = build_tiny_checkpoint(Path(folder) / "libra-tiny-demo")
        results: dict[int, list[float]] = {1: [], 3: []}
        for round_number in range(1, args.rounds + 1):
            for worker_count in (1, 3):
                workdir = Path(folder) / f"round{round_number}-workers{worker_count}"
                workdir.mkdir()
                rate = measure(worker_count, args.studies, args.max_new_tokens, checkpoint, workdir)
                results[worker_count].append(rate)
                print(f"round {round_number}: {worker_count} worker(s): {rate:.2f} studies/s")
        one, three = statistics.median(results[1]), statistics.median(results[3])
        print(f"median: 1 worker {one:.2f} studies/s, 3 workers {three:.2f} studies/s, ratio {three / one:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
