"""docs/conformance.md against the code: the networking tables match what the node negotiates.

Each table marked `<!-- conformance:NAME -->` is compared with the presentation contexts that
the receiver supports and the sender proposes. Real associations check them too. A pynetdicom
SCU proposes every documented context, and a few undocumented ones, to a running node, and a
pynetdicom SCP records what the node's sender and echo propose.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, JPEGBaseline8Bit, MPEG2MPML
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from node.config import DestinationSettings
from node.dimse_status import DimseStatus
from node.receiver import ACCEPTED_STORAGE_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES
from node.sender import SR_STORAGE_SOP_CLASSES, echo, send_file
from tests.node.conftest import MODALITY_AE_TITLE, NODE_AE_TITLE
from tests.peers import CHEST_PA_JPEG_BASELINE, REPO_ROOT, free_port

CONFORMANCE = REPO_ROOT / "docs" / "conformance.md"


def documented_table(name: str) -> list[list[str]]:
    """Return the body rows of the Markdown table after `<!-- conformance:NAME -->`."""
    text = CONFORMANCE.read_text()
    marker = f"<!-- conformance:{name} -->"
    assert marker in text, f"{marker} is missing from {CONFORMANCE}"
    lines = text.split(marker, 1)[1].strip().splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _uids(cell: str) -> list[str]:
    return [uid.strip() for uid in cell.split(",")]


@pytest.fixture
def receiving_node(make_node):
    return make_node(run_worker=False)


def test_documented_names_match_uids():
    for table in ("scp-sop-classes", "scp-transfer-syntaxes", "scp-verification-transfer-syntaxes", "scu-contexts"):
        for row in documented_table(table):
            assert UID(row[1]).name == row[0], (table, row)


def test_scp_tables_match_supported_contexts(receiving_node):
    supported = {
        str(context.abstract_syntax): [str(syntax) for syntax in context.transfer_syntax]
        for context in receiving_node.receiver._build_ae().supported_contexts
    }
    documented_classes = [row[1] for row in documented_table("scp-sop-classes")]
    documented_syntaxes = [row[1] for row in documented_table("scp-transfer-syntaxes")]
    verification_syntaxes = [row[1] for row in documented_table("scp-verification-transfer-syntaxes")]

    assert sorted(supported) == sorted(documented_classes)
    assert supported.pop(Verification) == verification_syntaxes
    for sop_class_uid, syntaxes in supported.items():
        assert syntaxes == documented_syntaxes, sop_class_uid
    assert list(ACCEPTED_STORAGE_SOP_CLASSES) == documented_classes[1:]
    assert list(ACCEPTED_TRANSFER_SYNTAXES) == documented_syntaxes


def test_scp_negotiation_accepts_exactly_documented(receiving_node):
    documented_classes = [row[1] for row in documented_table("scp-sop-classes")][1:]
    documented_syntaxes = [row[1] for row in documented_table("scp-transfer-syntaxes")]
    ae = AE(ae_title=MODALITY_AE_TITLE)
    proposed = [(sop_class, syntax) for sop_class in documented_classes for syntax in documented_syntaxes]
    undocumented = [(CTImageStorage, ExplicitVRLittleEndian), (documented_classes[0], MPEG2MPML)]
    for sop_class, syntax in proposed + undocumented:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", receiving_node.receiver.port, ae_title=NODE_AE_TITLE)
    assert assoc.is_established
    try:
        accepted = {(str(context.abstract_syntax), str(context.transfer_syntax[0])) for context in assoc.accepted_contexts}
        rejected = {(str(context.abstract_syntax), str(context.transfer_syntax[0])) for context in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert accepted == set(proposed)
    assert rejected == set(undocumented)


def test_scp_prefers_first_documented_syntax(receiving_node):
    ae = AE(ae_title=MODALITY_AE_TITLE)
    ae.add_requested_context(ACCEPTED_STORAGE_SOP_CLASSES[0], [JPEGBaseline8Bit, ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", receiving_node.receiver.port, ae_title=NODE_AE_TITLE)
    try:
        assert [str(context.transfer_syntax[0]) for context in assoc.accepted_contexts] == [ExplicitVRLittleEndian]
    finally:
        assoc.release()


@pytest.fixture
def recording_scp():
    """A pynetdicom SCP on a free loopback port that records the contexts each association proposes."""
    proposals: list[list[tuple[str, list[str]]]] = []
    lock = threading.Lock()

    def on_requested(event):
        with lock:
            proposals.append(
                [
                    (str(context.abstract_syntax), [str(syntax) for syntax in context.transfer_syntax])
                    for context in event.assoc.requestor.requested_contexts
                ]
            )

    ae = AE(ae_title="RECORDER")
    ae.add_supported_context(Verification)
    for sop_class in SR_STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_REQUESTED, on_requested)])
    try:
        yield port, proposals
    finally:
        server.shutdown()


def test_scu_proposals_match_documented(recording_scp, tmp_path):
    port, proposals = recording_scp
    documented = {row[1]: _uids(row[2]) for row in documented_table("scu-contexts")}
    destination = DestinationSettings(name="recorder", ae_title="RECORDER", host="127.0.0.1", port=port, timeout_seconds=10)

    # The association is negotiated before the file is looked at, so any DICOM file shows the proposal.
    send_file(destination, Path(CHEST_PA_JPEG_BASELINE), NODE_AE_TITLE)
    assert echo("127.0.0.1", port, "RECORDER", NODE_AE_TITLE) == DimseStatus.SUCCESS

    store_proposal, echo_proposal = proposals
    assert dict(store_proposal) == {uid: syntaxes for uid, syntaxes in documented.items() if uid != Verification}
    assert dict(echo_proposal) == {Verification: documented[Verification]}


def test_documented_statuses_match_enum():
    documented = {row[0]: int(row[1], 16) for row in documented_table("dimse-statuses")}
    assert documented == {member.name: int(member) for member in DimseStatus}


def test_documented_rejections_match_receiver():
    from node import receiver

    documented = {
        tuple(int(re.match(r"\d+", cell).group()) for cell in row[1:4]) for row in documented_table("association-rejections")
    }
    assert documented == {
        receiver.REJECT_CALLED_AE_NOT_RECOGNIZED,
        receiver.REJECT_CALLING_AE_NOT_RECOGNIZED,
        receiver.REJECT_LOCAL_LIMIT_EXCEEDED,
    }
