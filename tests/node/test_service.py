"""NodeService wiring: each stage wakes the next one in the same process."""

from __future__ import annotations

from node.service import NodeService
from tests.node.conftest import dcmsend, node_config, orthanc_destination
from tests.peers import CHEST_PA_JPEG_BASELINE

# Longer than the test waits: a report arrives only if every stage wakes the next one.
NEVER_SECONDS = 3600.0
SR_TIMEOUT_SECONDS = 120


def test_service_stages_wake_without_polling(tmp_path, tiny_checkpoint, orthanc):
    config = node_config(
        tmp_path / "node",
        tiny_checkpoint,
        node={"study_stable_seconds": 0.5, "stability_check_seconds": NEVER_SECONDS},
        worker={"poll_seconds": NEVER_SECONDS},
        destinations=[orthanc_destination(orthanc)],
    )
    service = NodeService(config)
    service.sender.poll_seconds = NEVER_SECONDS
    service.start()
    try:
        assert service.worker.model_loaded.wait(SR_TIMEOUT_SECONDS)
        result = dcmsend(service.receiver.port, CHEST_PA_JPEG_BASELINE)
        assert result.returncode == 0, result.stderr
        found = orthanc.wait_for_instances("SR", 1, SR_TIMEOUT_SECONDS)
        assert len(found) == 1
    finally:
        service.stop()
