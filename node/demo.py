"""`libra-node demo`: one synthetic patient's prior and current chest study through a real node to a PACS.

Everything runs on loopback ports chosen at start: Orthanc as the PACS when it is installed,
otherwise a pynetdicom storage SCP. The node uses the tiny random demo checkpoint, so the
findings text is meaningless, and the SR states this.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import structlog

from node.config import parse_config

log = structlog.get_logger(__name__)

DEMO_CALLING_AE_TITLE = "DEMO_MODALITY"
DEMO_PACS_AE_TITLE = "DEMO_PACS"
SR_MODALITY = "SR"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OrthancPACS:
    """Orthanc started on free loopback ports with its storage in the demo folder."""

    name = "Orthanc"

    def __init__(self, workdir: Path) -> None:
        self.dicom_port = _free_port()
        self.http_port = _free_port()
        config = {
            "Name": "libra-node-demo",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "DicomAet": DEMO_PACS_AE_TITLE,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "orthanc.json").write_text(json.dumps(config))
        self._log = (workdir / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [shutil.which("Orthanc"), str(workdir / "orthanc.json")], stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self._get("/system")
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start; see {workdir / 'orthanc.log'}") from None
                time.sleep(0.2)

    def _get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return json.loads(response.read()) if path != "/file" else response.read()

    def stored_srs(self) -> list[tuple[str, bytes]]:
        """Return (where, file bytes) of every SR Orthanc stores."""
        found = []
        for series_id in self._get("/series"):
            series = self._get(f"/series/{series_id}")
            if series["MainDicomTags"].get("Modality") != SR_MODALITY:
                continue
            for instance_id in series["Instances"]:
                url = f"http://127.0.0.1:{self.http_port}/instances/{instance_id}/file"
                with urllib.request.urlopen(url, timeout=10) as response:
                    found.append((f"Orthanc instance {instance_id} ({url})", response.read()))
        return found

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


class PynetdicomPACS:
    """A minimal pynetdicom storage SCP that writes what it receives to a folder."""

    name = "pynetdicom storage SCP"

    def __init__(self, workdir: Path) -> None:
        from pynetdicom import AE, StoragePresentationContexts, evt

        self.folder = workdir / "received"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dicom_port = _free_port()
        ae = AE(ae_title=DEMO_PACS_AE_TITLE)
        ae.supported_contexts = StoragePresentationContexts
        self._server = ae.start_server(
            ("127.0.0.1", self.dicom_port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        dataset.save_as(self.folder / f"{dataset.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    def stored_srs(self) -> list[tuple[str, bytes]]:
        found = []
        for path in sorted(self.folder.glob("*.dcm")):
            if pydicom.dcmread(path, stop_before_pixels=True).get("Modality") == SR_MODALITY:
                found.append((str(path), path.read_bytes()))
        return found

    def stop(self) -> None:
        self._server.shutdown()


def _demo_datasets(input_dir: Path | None) -> list[list[pydicom.Dataset]]:
    """Return the studies to send, in order: synthetic prior then current, or the input files."""
    if input_dir is not None:
        from node.send_tool import expand_paths

        return [[pydicom.dcmread(path) for path in expand_paths([input_dir])]]
    from node.synthetic import synthetic_chest_study

    today = dt.date.today()
    prior = synthetic_chest_study(study_date=today - dt.timedelta(days=365), seed=1)
    current = synthetic_chest_study(study_date=today, seed=2, opacity=0.8)
    return [[prior], [current]]


def _wait_for_srs(pacs, count: int, timeout_seconds: float) -> list[tuple[str, bytes]]:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        found = pacs.stored_srs()
        if len(found) >= count:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"the PACS contains fewer than {count} SRs after {timeout_seconds:.0f} s")


def _find_sr_of_study(srs: list[tuple[str, bytes]], study_instance_uid: str) -> tuple[str, pydicom.Dataset]:
    for where, content in srs:
        sr = pydicom.dcmread(io.BytesIO(content))
        if str(sr.StudyInstanceUID) == study_instance_uid:
            return where, sr
    raise TimeoutError(f"no SR of study {study_instance_uid} at the PACS")


def run_demo(workdir: Path = Path("var/demo"), input_dir: Path | None = None, timeout_seconds: float = 300.0) -> int:
    """Run the demo and return the exit status (0 when the SR arrived at the PACS)."""
    from node.log_config import configure_logging
    from node.send_tool import send_datasets
    from node.service import NodeService
    from node.sr_show import format_sr_tree

    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    configure_logging("console", "info")

    pacs = OrthancPACS(workdir / "pacs") if shutil.which("Orthanc") else PynetdicomPACS(workdir / "pacs")
    print(f"PACS: {pacs.name} ({DEMO_PACS_AE_TITLE}@127.0.0.1:{pacs.dicom_port})")
    node_port = _free_port()
    config = parse_config(
        {
            "node": {
                "ae_title": "LIBRA_NODE",
                "bind_address": "127.0.0.1",
                "port": node_port,
                "data_dir": str(workdir / "node"),
                "study_stable_seconds": 2,
                "free_disk_reserve_mb": 0,
            },
            "callers": [{"ae_title": DEMO_CALLING_AE_TITLE}],
            "destinations": [
                {"name": "pacs", "ae_title": DEMO_PACS_AE_TITLE, "host": "127.0.0.1", "port": pacs.dicom_port}
            ],
            "model": {"max_new_tokens": 48},
            "logging": {"format": "console"},
            "admin": {"port": 0},
        },
        source="demo configuration",
    )
    # The demo checkpoint is shared between demo runs so that it is built only once.
    shared_models = Path("var").resolve() / "models"
    node_models = config.node.data_dir / "models"
    node_models.parent.mkdir(parents=True, exist_ok=True)
    shared_models.mkdir(parents=True, exist_ok=True)
    node_models.symlink_to(shared_models, target_is_directory=True)

    service = NodeService(config)
    service.start()
    if service.admin is not None:
        print(f"status page: http://127.0.0.1:{service.admin.port}/")
    try:
        studies = _demo_datasets(input_dir)
        for number, datasets in enumerate(studies, start=1):
            statuses = send_datasets("LIBRA_NODE", "127.0.0.1", node_port, datasets, DEMO_CALLING_AE_TITLE)
            print(f"sent study {number} of {len(studies)}: {len(datasets)} instance(s), statuses {[hex(s) if s is not None else None for s in statuses]}")
            srs = _wait_for_srs(pacs, number, timeout_seconds)
        last_study_uid = str(studies[-1][0].StudyInstanceUID)
        where, sr = _find_sr_of_study(srs, last_study_uid)
        print()
        print(format_sr_tree(sr))
        print()
        print(f"SR received by the PACS: {where}")
        print(f"SR kept in the node's store under: {config.node.data_dir / 'store'}")
        return 0
    except TimeoutError as exc:
        print(f"demo failed: {exc}")
        return 1
    finally:
        service.stop()
        pacs.stop()
