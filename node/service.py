"""The node process: receiver, study-stable timer, worker and sender wired around one index and store."""

from __future__ import annotations

import os
import threading

import structlog

from node.config import NodeConfig
from node.index.session import IndexDatabase
from node.log_config import load_or_create_hash_key
from node.receiver import Receiver
from node.sender import Sender
from node.stability import StabilityTimer
from node.store import FileStore, make_private_directory
from node.worker import Worker

log = structlog.get_logger(__name__)


class NodeService:
    """All parts of one `libra-node run` process.

    Parameters
    ----------
    config
        The validated configuration.
    run_worker
        Whether this process also runs report jobs (``--no-worker`` turns it off).
    """

    def __init__(self, config: NodeConfig, run_worker: bool = True) -> None:
        self.config = config
        data_dir = config.node.data_dir
        make_private_directory(data_dir)
        os.chmod(data_dir, 0o700)
        self.store = FileStore(data_dir / "store", config.node.free_disk_reserve_mb * 1024 * 1024)
        self.index = IndexDatabase(config.database_url)
        # A new single-machine SQLite index is created at first start; any other database
        # must be brought to the current schema with `libra-node db upgrade`.
        self.index.prepare_schema(create_if_empty=self.index.is_sqlite)
        hash_key = load_or_create_hash_key(data_dir)
        self.receiver = Receiver(config, self.store, self.index, hash_key)
        self.timer = StabilityTimer(config, self.index)
        self.worker = Worker(config, self.index, self.store) if run_worker and config.worker.enabled else None
        self.sender = Sender(config, self.index, self.store)
        self.stopped = threading.Event()

    def start(self) -> None:
        """Start every part; the receiver accepts associations when this returns."""
        self.store.clean_incoming()
        if not self.config.callers:
            log.warning("receiver.any_caller_allowed", reason="no [[callers]] configured; every calling AE title may store")
        if self.worker is not None:
            self.worker.start()
        self.sender.start()
        self.timer.start()
        self.receiver.start()
        log.info(
            "node.ready",
            ae_title=self.config.node.ae_title,
            port=self.receiver.port,
            data_dir=str(self.config.node.data_dir),
            worker=self.worker is not None,
            destinations=[destination.name for destination in self.config.destinations],
        )

    def stop(self) -> None:
        """Stop accepting associations, then let the timer, worker and sender finish what is in hand."""
        self.receiver.stop()
        self.timer.stop()
        if self.worker is not None:
            self.worker.stop()
        self.sender.stop()
        self.index.dispose()
        self.stopped.set()
        log.info("node.stopped")


class WorkerService:
    """A `libra-node worker` process: report jobs only, on a shared index and store.

    The index must already be at the current schema (`libra-node db upgrade`).
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = FileStore(config.node.data_dir / "store", config.node.free_disk_reserve_mb * 1024 * 1024)
        self.index = IndexDatabase(config.database_url)
        self.index.prepare_schema(create_if_empty=False)
        self.worker = Worker(config, self.index, self.store)
        self.stopped = threading.Event()

    def start(self) -> None:
        """Load the model and start claiming jobs."""
        self.worker.start()
        log.info("worker.ready", worker_id=self.worker.worker_id)

    def stop(self) -> None:
        """Finish or release the job in hand, then close the index."""
        self.worker.stop()
        self.index.dispose()
        self.stopped.set()
        log.info("worker.stopped", worker_id=self.worker.worker_id)
