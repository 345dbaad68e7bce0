"""DICOM TLS: the receiver's listener and the sender's associations, with real TLS peers.

The peers are dcmtk (echoscu, storescu), pynetdicom and Orthanc, all on loopback, with
throwaway certificates made by openssl for each test session.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from sqlalchemy import select
from structlog.testing import capture_logs

from node.config import ConfigError, DestinationSettings, QuerySourceSettings, load_config, parse_config
from node.dimse_status import DimseStatus
from node.index.models import Instance, OutboxEntry, OutboxState
from node.query_retrieve import Deadline, QueryRetrieveError, QuerySourceClient, release
from node.sender import SR_STORAGE_SOP_CLASSES, send_file
from node.service import NodeService
from node.tls import TLSConfigError
from tests.node.conftest import MODALITY_AE_TITLE, NODE_AE_TITLE, dcmsend, node_config, orthanc_destination, wait_until
from tests.peers import CHEST_PA_JPEG_BASELINE, free_port, start_orthanc
from tests.tls_certificates import ThrowawayPKI, make_test_pki

SCP_AE_TITLE = "TLS_PACS"



@pytest.fixture
def database_url():
    """TLS does not depend on the index, so these nodes run on SQLite only."""
    return ""

@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> ThrowawayPKI:
    """Two throwaway CAs with server and client certificates."""
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def tls_node_settings(pki: ThrowawayPKI, client_certificate_required: bool = True) -> dict:
    """Return the [node] keys of a TLS listener with the test server certificate."""
    settings = {
        "tls": True,
        "tls_certificate_file": str(pki.server.certificate_file),
        "tls_private_key_file": str(pki.server.private_key_file),
        "acse_timeout_seconds": 10,
    }
    if client_certificate_required:
        settings["tls_ca_file"] = str(pki.ca_file)
    return settings


def client_context(
    ca_file: Path,
    certificate=None,
    tls_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """Return a client context; `tls_version` pins the protocol version it offers."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca_file)
    if certificate is not None:
        context.load_cert_chain(certificate.certificate_file, certificate.private_key_file)
    if tls_version is not None:
        # OpenSSL 3 allows TLS 1.0 and 1.1 only at security level 0.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = tls_version
        context.maximum_version = tls_version
    return context


def tls_echo(port: int, context: ssl.SSLContext | None, server_hostname: str = "localhost") -> int | None:
    """Send a C-ECHO over TLS (plain TCP when `context` is None); None when no association."""
    ae = AE(ae_title=MODALITY_AE_TITLE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 15
    tls_args = (context, server_hostname) if context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE_TITLE, tls_args=tls_args)
    if not assoc.is_established:
        return None
    try:
        response = assoc.send_c_echo()
        return int(response.Status) if "Status" in response else None
    finally:
        assoc.release()


def dcmtk_tls_arguments(pki: ThrowawayPKI, certificate=None) -> list[str]:
    """Return dcmtk's TLS options: a client key and certificate, and the trusted CA."""
    certificate = certificate or pki.client
    return ["+tls", str(certificate.private_key_file), str(certificate.certificate_file), "+cf", str(pki.ca_file)]


def handshake_failures(logs: list[dict]) -> list[dict]:
    """Return the captured `receiver.tls_handshake_failed` events."""
    return [entry for entry in logs if entry["event"] == "receiver.tls_handshake_failed"]


@pytest.fixture
def tls_node(make_node, pki):
    """A receiving node whose listener requires TLS with a client certificate."""
    return make_node(run_worker=False, node=tls_node_settings(pki))


# --- Receiver ---------------------------------------------------------------------------------


def test_tls_echo_with_client_certificate_succeeds(tls_node, pki):
    with capture_logs() as logs:
        status = tls_echo(tls_node.receiver.port, client_context(pki.ca_file, pki.client))
    assert status == DimseStatus.SUCCESS
    established = [entry for entry in logs if entry["event"] == "receiver.tls_established"]
    assert established[0]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert established[0]["peer_certificate_subject"] == "commonName=modality1"


@pytest.mark.peers
def test_tls_dcmtk_echoscu_succeeds(tls_node, pki):
    result = subprocess.run(
        ["echoscu", *dcmtk_tls_arguments(pki), "127.0.0.1", str(tls_node.receiver.port),
         "-aet", MODALITY_AE_TITLE, "-aec", NODE_AE_TITLE],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.peers
def test_tls_dcmtk_storescu_instance_stored(tls_node, pki):
    result = subprocess.run(
        ["storescu", *dcmtk_tls_arguments(pki), "--propose-jpeg8", "127.0.0.1", str(tls_node.receiver.port),
         str(CHEST_PA_JPEG_BASELINE), "-aet", MODALITY_AE_TITLE, "-aec", NODE_AE_TITLE],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    expected_uid = str(pydicom.dcmread(CHEST_PA_JPEG_BASELINE, stop_before_pixels=True).SOPInstanceUID)
    with tls_node.index.transaction() as session:
        stored = session.scalars(select(Instance.sop_instance_uid)).all()
    assert stored == [expected_uid]


@pytest.mark.peers
def test_tls_plain_tcp_client_rejected_node_keeps_serving(tls_node, pki):
    with capture_logs() as logs:
        result = subprocess.run(
            ["echoscu", "127.0.0.1", str(tls_node.receiver.port), "-aet", MODALITY_AE_TITLE, "-aec", NODE_AE_TITLE],
            capture_output=True, text=True, timeout=60,
        )
        failures = wait_until(lambda: handshake_failures(logs), 10, "the plain TCP attempt is logged")
    assert result.returncode != 0
    assert failures[0]["peer_host"] == "127.0.0.1"
    assert tls_echo(tls_node.receiver.port, client_context(pki.ca_file, pki.client)) == DimseStatus.SUCCESS


def test_tls_silent_tcp_client_does_not_block_listener(tls_node, pki):
    # A peer that connects and never starts the handshake must not hold up other callers.
    with socket.create_connection(("127.0.0.1", tls_node.receiver.port)):
        status = tls_echo(tls_node.receiver.port, client_context(pki.ca_file, pki.client))
    assert status == DimseStatus.SUCCESS


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_rejected(tls_node, pki):
    with capture_logs() as logs:
        status = tls_echo(
            tls_node.receiver.port, client_context(pki.ca_file, pki.client, tls_version=ssl.TLSVersion.TLSv1_1)
        )
        failures = wait_until(lambda: handshake_failures(logs), 10, "the TLS 1.1 attempt is logged")
    assert status is None
    # The failure is the node's: the offer reached it and it rejected the protocol version.
    assert "UNSUPPORTED_PROTOCOL" in failures[0]["error"]


def test_tls_1_2_accepted(tls_node, pki):
    context = client_context(pki.ca_file, pki.client, tls_version=ssl.TLSVersion.TLSv1_2)
    assert tls_echo(tls_node.receiver.port, context) == DimseStatus.SUCCESS


@pytest.mark.parametrize("certificate_name", ["none", "other_client"], ids=["no-certificate", "other-ca"])
def test_tls_client_certificate_required(tls_node, pki, certificate_name):
    certificate = getattr(pki, certificate_name, None)
    with capture_logs() as logs:
        status = tls_echo(tls_node.receiver.port, client_context(pki.ca_file, certificate))
        failures = wait_until(lambda: handshake_failures(logs), 10, "the rejected handshake is logged")
    assert status is None
    assert failures[0]["peer_host"] == "127.0.0.1"


def test_tls_without_ca_accepts_any_client(make_node, pki):
    node = make_node(run_worker=False, node=tls_node_settings(pki, client_certificate_required=False))
    assert tls_echo(node.receiver.port, client_context(pki.ca_file)) == DimseStatus.SUCCESS


def test_tls_client_checks_node_hostname(tls_node, pki):
    context = client_context(pki.ca_file, pki.client)
    assert tls_echo(tls_node.receiver.port, context, server_hostname="pacs.example.org") is None


# --- Configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node_settings", "expected"),
    [
        ({"tls_ca_file": "ca.pem"}, "tls_ca_file set but tls = false"),
        ({"tls": True}, "tls = true needs tls_certificate_file and tls_private_key_file"),
        ({"tls": True, "tls_certificate_file": "node.pem"}, "give tls_certificate_file and tls_private_key_file together"),
    ],
    ids=["ca-without-tls", "tls-without-certificate", "certificate-without-key"],
)
def test_tls_config_inconsistent_keys_rejected(node_settings, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config({"node": node_settings})


def test_tls_config_relative_paths_resolved(tmp_path):
    config_path = tmp_path / "node.toml"
    config_path.write_text(
        '[node]\ntls = true\ntls_certificate_file = "tls/node.pem"\ntls_private_key_file = "tls/node.key"\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
        'tls = true\ntls_ca_file = "tls/ca.pem"\n'
        '[[query_sources]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
        'tls = true\ntls_ca_file = "tls/query-ca.pem"\n'
    )
    config = load_config(config_path)
    assert config.node.tls_certificate_file == tmp_path / "tls" / "node.pem"
    assert config.destinations[0].tls_ca_file == tmp_path / "tls" / "ca.pem"
    assert config.query_sources[0].tls_ca_file == tmp_path / "tls" / "query-ca.pem"


def test_tls_missing_key_file_stops_node(tmp_path, pki):
    settings = tls_node_settings(pki) | {"tls_private_key_file": str(tmp_path / "missing.key")}
    config = node_config(tmp_path / "node", None, node=settings)
    with pytest.raises(TLSConfigError, match="tls_private_key_file"):
        NodeService(config, run_worker=False)


def test_tls_destination_missing_ca_stops_node(tmp_path, pki):
    destination = {
        "name": "tls_pacs", "ae_title": SCP_AE_TITLE, "host": "127.0.0.1", "port": 104,
        "tls": True, "tls_ca_file": str(tmp_path / "missing-ca.pem"),
    }
    config = node_config(tmp_path / "node", None, destinations=[destination])
    with pytest.raises(TLSConfigError, match="destination 'tls_pacs': tls_ca_file"):
        NodeService(config, run_worker=False)


def test_tls_invalid_certificate_stops_node(tmp_path, pki):
    not_a_certificate = tmp_path / "node.pem"
    not_a_certificate.write_text("not a certificate\n")
    settings = tls_node_settings(pki) | {"tls_certificate_file": str(not_a_certificate)}
    config = node_config(tmp_path / "node", None, node=settings)
    with pytest.raises(TLSConfigError, match="cannot be loaded"):
        NodeService(config, run_worker=False)


def test_tls_private_key_readable_by_others_warned(tmp_path, pki):
    key_copy = tmp_path / "node.key"
    key_copy.write_bytes(pki.server.private_key_file.read_bytes())
    key_copy.chmod(0o644)
    settings = tls_node_settings(pki) | {"tls_private_key_file": str(key_copy)}
    config = node_config(tmp_path / "node", None, node=settings)
    with capture_logs() as logs:
        NodeService(config, run_worker=False).index.dispose()
    warnings = [entry for entry in logs if entry["event"] == "tls.private_key_readable_by_others"]
    assert warnings[0]["path"] == str(key_copy)


# --- Sender -----------------------------------------------------------------------------------


@dataclass
class TLSStorageSCP:
    """A pynetdicom Verification and Storage SCP for SR classes on a TLS port, recording what it received."""

    port: int
    received: list[Dataset] = field(default_factory=list)


@pytest.fixture
def tls_storage_scp(pki):
    """Start TLS Storage SCPs with the test server certificate; all are stopped after the test."""
    servers = []

    def start(client_certificate_required: bool = False) -> TLSStorageSCP:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server.certificate_file, pki.server.private_key_file)
        if client_certificate_required:
            context.load_verify_locations(pki.ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        scp = TLSStorageSCP(port=free_port())
        lock = threading.Lock()

        def on_store(event):
            with lock:
                scp.received.append(event.dataset)
            return 0x0000

        ae = AE(ae_title=SCP_AE_TITLE)
        ae.add_supported_context(Verification)
        for sop_class in SR_STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class)
        servers.append(
            ae.start_server(
                ("127.0.0.1", scp.port), block=False, ssl_context=context, evt_handlers=[(evt.EVT_C_STORE, on_store)]
            )
        )
        return scp

    yield start
    for server in servers:
        server.shutdown()


def basic_text_sr(tmp_path: Path) -> tuple[Path, str]:
    """Write a minimal Basic Text SR file; return its path and SOP Instance UID."""
    dataset = Dataset()
    dataset.SOPClassUID = BasicTextSRStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.Modality = "SR"
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "sr.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path, str(dataset.SOPInstanceUID)


def tls_destination(port: int, **settings) -> DestinationSettings:
    return DestinationSettings(
        name="tls_pacs", ae_title=SCP_AE_TITLE, host="127.0.0.1", port=port, tls=True, timeout_seconds=15, **settings
    )


def test_sender_tls_delivers_sr(tls_storage_scp, pki, tmp_path):
    scp = tls_storage_scp()
    path, sop_instance_uid = basic_text_sr(tmp_path)
    result = send_file(tls_destination(scp.port, tls_ca_file=pki.ca_file), path, NODE_AE_TITLE)
    assert result.delivered, result.error
    assert [str(dataset.SOPInstanceUID) for dataset in scp.received] == [sop_instance_uid]


def test_sender_tls_wrong_ca_not_delivered(tls_storage_scp, pki, tmp_path):
    scp = tls_storage_scp()
    path, _ = basic_text_sr(tmp_path)
    result = send_file(tls_destination(scp.port, tls_ca_file=pki.other_ca_file), path, NODE_AE_TITLE)
    assert not result.delivered
    assert "certificate verify failed" in result.error
    assert scp.received == []


def test_sender_tls_wrong_hostname_not_delivered(tls_storage_scp, pki, tmp_path):
    scp = tls_storage_scp()
    path, _ = basic_text_sr(tmp_path)
    destination = tls_destination(scp.port, tls_ca_file=pki.ca_file, tls_server_hostname="pacs.example.org")
    result = send_file(destination, path, NODE_AE_TITLE)
    assert not result.delivered
    assert "Hostname mismatch" in result.error
    assert scp.received == []


def test_sender_tls_client_certificate_presented(tls_storage_scp, pki, tmp_path):
    scp = tls_storage_scp(client_certificate_required=True)
    path, _ = basic_text_sr(tmp_path)
    without_certificate = send_file(tls_destination(scp.port, tls_ca_file=pki.ca_file), path, NODE_AE_TITLE)
    with_certificate = send_file(
        tls_destination(
            scp.port,
            tls_ca_file=pki.ca_file,
            tls_certificate_file=pki.client.certificate_file,
            tls_private_key_file=pki.client.private_key_file,
        ),
        path,
        NODE_AE_TITLE,
    )
    assert not without_certificate.delivered
    assert with_certificate.delivered, with_certificate.error
    assert len(scp.received) == 1


def test_sender_tls_wrong_ca_outbox_failed(make_node, tls_storage_scp, pki):
    scp = tls_storage_scp()
    destination = {
        "name": "tls_pacs", "ae_title": SCP_AE_TITLE, "host": "127.0.0.1", "port": scp.port,
        "tls": True, "tls_ca_file": str(pki.other_ca_file),
        "max_attempts": 2, "retry_backoff_seconds": 0.2, "timeout_seconds": 15,
    }
    node = make_node(destinations=[destination])
    assert dcmsend(node.receiver.port, CHEST_PA_JPEG_BASELINE).returncode == 0

    def failed_entries():
        with node.index.transaction() as session:
            entries = session.scalars(select(OutboxEntry)).all()
            return [entry for entry in entries if entry.state == OutboxState.FAILED]

    entries = wait_until(failed_entries, 180, "the outbox entry is marked failed")
    assert entries[0].attempts == 2
    assert entries[0].sent_at is None
    assert "certificate verify failed" in entries[0].last_error
    assert scp.received == []


@pytest.mark.peers
def test_tls_in_and_out_sr_reaches_orthanc(make_node, pki, tmp_path):
    orthanc = start_orthanc(
        tmp_path / "orthanc",
        extra_settings={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.server.certificate_file),
            "DicomTlsPrivateKey": str(pki.server.private_key_file),
            "DicomTlsTrustedCertificates": str(pki.ca_file),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    try:
        destination = orthanc_destination(
            orthanc,
            tls=True,
            tls_ca_file=str(pki.ca_file),
            tls_server_hostname="localhost",
            tls_certificate_file=str(pki.client.certificate_file),
            tls_private_key_file=str(pki.client.private_key_file),
        )
        node = make_node(destinations=[destination], node=tls_node_settings(pki))
        result = subprocess.run(
            ["storescu", *dcmtk_tls_arguments(pki), "--propose-jpeg8", "127.0.0.1", str(node.receiver.port),
             str(CHEST_PA_JPEG_BASELINE), "-aet", MODALITY_AE_TITLE, "-aec", NODE_AE_TITLE],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        srs = orthanc.wait_for_instances("SR", 1, timeout_seconds=120)
        source = pydicom.dcmread(CHEST_PA_JPEG_BASELINE, stop_before_pixels=True)
        assert srs[0]["StudyInstanceUID"] == str(source.StudyInstanceUID)
    finally:
        orthanc.stop()


# --- Query sources (prior retrieval) ----------------------------------------------------------


def tls_query_source(port: int, **settings) -> QuerySourceSettings:
    return QuerySourceSettings(name="tls_pacs", ae_title=SCP_AE_TITLE, host="127.0.0.1", port=port, tls=True, **settings)


def test_query_source_tls_association_established(tls_storage_scp, pki):
    scp = tls_storage_scp()
    client = QuerySourceClient(tls_query_source(scp.port, tls_ca_file=pki.ca_file), NODE_AE_TITLE)
    assoc = client.associate([(Verification, None)], Deadline(15))
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == DimseStatus.SUCCESS
    finally:
        release(assoc)


def test_query_source_tls_wrong_ca_rejected(tls_storage_scp, pki):
    scp = tls_storage_scp()
    client = QuerySourceClient(tls_query_source(scp.port, tls_ca_file=pki.other_ca_file), NODE_AE_TITLE)
    with pytest.raises(QueryRetrieveError, match="TLS handshake .* certificate verify failed"):
        client.associate([(Verification, None)], Deadline(15))
