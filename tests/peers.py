"""Real DICOM peers for the tests: Orthanc as the PACS, dcmtk as the modality, dciodvfy.

Every server starts on free loopback ports in a temporary folder and is stopped by the
fixture that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
CXR_DIR = SHARED_DIR / "data" / "cxr"

# The shared radiographs by role: chest PA in three compressed syntaxes, and three non-chest cases.
CHEST_PA_JPEG_BASELINE = CXR_DIR / "siim_cr_chest_pa_mono2_8bit_jpegbaseline.dcm"
CHEST_PA_J2K = CXR_DIR / "wg04_rg1_philips_cr_chest_pa_mono1_15bit_j2k.dcm"
CHEST_PA_JPEGLS = CXR_DIR / "wg04_rg1_philips_cr_chest_pa_mono1_15bit_jpegls_nearlossless.dcm"
CANINE_LATERAL_DX = CXR_DIR / "highdicom_dx_canine_thorax_lateral_forpresentation_mono1_8bit.dcm"
HIP_CR_RLE = CXR_DIR / "wg04_rg2_fuji_cr_hip_nonchest_mono2_10bit_rle.dcm"
CHEST_CT = CXR_DIR / "nysbu_ct_chest_toshiba_A046441_19010101_nonCR.dcm"

CHEST_FILES = [CHEST_PA_JPEG_BASELINE, CHEST_PA_J2K, CHEST_PA_JPEGLS]
NON_CHEST_FILES = [CANINE_LATERAL_DX, HIP_CR_RLE, CHEST_CT]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_seconds: float = 30.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts TCP connections on host:port, or raise TimeoutError."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_seconds} s")


@dataclass
class Orthanc:
    """A running Orthanc server on loopback, with a small REST client."""

    ae_title: str
    dicom_port: int
    http_port: int
    process: subprocess.Popen
    log_path: Path

    def get(self, path: str):
        """GET a REST path (for example '/instances') and return the decoded JSON."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        """GET a REST path and return the raw body (for example '/instances/ID/file')."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as response:
            return response.read()

    def post(self, path: str, body: bytes | dict | list) -> object:
        """POST raw bytes or JSON to a REST path and return the decoded JSON reply."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def instances_with_modality(self, modality: str) -> list[dict]:
        """Return the tags (simplified) of every stored instance whose series has this Modality."""
        found = []
        for series_id in self.get("/series"):
            series = self.get(f"/series/{series_id}")
            if series["MainDicomTags"].get("Modality") != modality:
                continue
            for instance_id in series["Instances"]:
                found.append(self.get(f"/instances/{instance_id}/simplified-tags") | {"_id": instance_id})
        return found

    def wait_for_instances(self, modality: str, count: int, timeout_seconds: float) -> list[dict]:
        """Poll until at least `count` instances of `modality` are stored, or raise TimeoutError."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            found = self.instances_with_modality(modality)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"Orthanc holds {len(found)} {modality} instances, expected {count}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the server and wait for it to exit."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_orthanc(
    workdir: Path, ae_title: str = "ORTHANC", modalities: dict | None = None, extra_settings: dict | None = None
) -> Orthanc:
    """Start Orthanc with its storage in `workdir` on free loopback ports and wait until it is up.

    `modalities` is Orthanc's DicomModalities map (name -> [AE title, host, port]), needed
    only when Orthanc must send to or accept retrieves from another AE. `extra_settings`
    adds or replaces configuration keys, for example the DicomTls* keys.
    """
    orthanc_binary = shutil.which("Orthanc")
    if orthanc_binary is None:
        raise RuntimeError("Orthanc is not installed: run 'bash scripts/install.sh --test'")
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "libra-node-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomModalities": modalities or {},
        "Plugins": [],
        "StableAge": 1,
    } | (extra_settings or {})
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log_path = workdir / "orthanc.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [orthanc_binary, str(config_path)], stdout=log_file, stderr=subprocess.STDOUT
        )
    orthanc = Orthanc(ae_title, dicom_port, http_port, process, log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start: {log_path.read_text()[-2000:]}")
            try:
                orthanc.get("/system")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise TimeoutError("Orthanc did not answer on its HTTP port within 30 s") from None
                time.sleep(0.2)
        wait_for_port(dicom_port)
    except BaseException:
        orthanc.stop()
        raise
    return orthanc


def dciodvfy_errors(path: Path) -> list[str]:
    """Run dciodvfy on a file and return its error lines (an empty list means valid)."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if line.startswith("Error")]


# The PostgreSQL server the tests use; CI starts it (.ci/run) and each test gets its own database.
POSTGRES_ADMIN_URL = os.environ.get("LIBRA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """Create an empty PostgreSQL database at the current schema, yield its SQLAlchemy URL, drop it.

    Fails the calling test when the server is not reachable, so that a missing PostgreSQL
    never turns into silently skipped scale-out coverage.
    """
    import psycopg

    from node.index.session import IndexDatabase

    name = f"libra_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise RuntimeError(
            f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: start it, or set LIBRA_TEST_POSTGRES"
        ) from exc
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base_url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base_url}/{name}"
    index = IndexDatabase(url)
    index.upgrade_schema()
    index.dispose()
    try:
        yield url
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class SlowProxy:
    """A TCP proxy on loopback that forwards client-to-server bytes at a limited rate.

    It makes a large C-STORE take seconds, so that a test can kill or abort it mid-transfer.
    """

    def __init__(self, target_port: int, bytes_per_second: int = 2 * 1024 * 1024) -> None:
        import threading

        self.target_port = target_port
        self.bytes_per_second = bytes_per_second
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        import threading

        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, throttled: bool) -> None:
        chunk_size = 64 * 1024
        try:
            while data := source.recv(chunk_size):
                sink.sendall(data)
                if throttled:
                    time.sleep(len(data) / self.bytes_per_second)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        """Close the listener and every forwarded connection."""
        self._stopped.set()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass
