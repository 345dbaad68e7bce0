"""The node process: receiver, study-stable timer, worker and sender wired around one index and store."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from node.config import ConfigError, NodeConfig, load_config
from node.index.session import IndexDatabase
from node.log_config import load_or_create_hash_key
from node.metrics import NodeMetrics
from node.receiver import Receiver
from node.retention import Retention
from node.sender import Sender
from node.stability import StabilityTimer
from node.store import FileStore, make_private_directory
from node.worker import Worker

log = structlog.get_logger(__name__)


# The parts of the configuration that a reload applies; the others need a restart.
RELOADABLE_SECTIONS = ("callers", "destinations")


@dataclass(frozen=True)
class ReloadResult:
    """The callers and destinations a reload applied, and the sections that need a restart."""

    callers: tuple[str, ...]
    destinations: tuple[str, ...]
    restart_needed_for: tuple[str, ...]

    def as_dict(self) -> dict:
        """Return the result as JSON-compatible values."""
        return {
            "callers": list(self.callers),
            "destinations": list(self.destinations),
            "restart_needed_for": list(self.restart_needed_for),
        }


class NodeService:
    """All parts of one `libra-node run` process.

    Parameters
    ----------
    config
        The validated configuration.
    run_worker
        Whether this process also runs report jobs (``--no-worker`` turns it off).
    config_path
        The file `config` was loaded from. Reloads (SIGHUP, the admin API) and AE changes
        through the admin API read and edit it; without it they are refused.
    """

    def __init__(self, config: NodeConfig, run_worker: bool = True, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = NodeMetrics()
        self._reload_lock = threading.Lock()
        data_dir = config.node.data_dir
        make_private_directory(data_dir)
        os.chmod(data_dir, 0o700)
        self.store = FileStore(data_dir / "store", config.node.free_disk_reserve_mb * 1024 * 1024)
        self.index = IndexDatabase(config.database_url)
        # A new single-machine SQLite index is created at first start; any other database
        # must be brought to the current schema with `libra-node db upgrade`.
        self.index.prepare_schema(create_if_empty=self.index.is_sqlite)
        hash_key = load_or_create_hash_key(data_dir)
        self.metrics.add_index_counts(self.index)
        # Each stage wakes the next one in this process when it commits work for it, so a report
        # waits for no poll interval. The polls remain for work from other processes.
        self.sender = Sender(config, self.index, self.store, metrics=self.metrics)
        self.worker = (
            Worker(
                config,
                self.index,
                self.store,
                hash_key=hash_key,
                metrics=self.metrics,
                on_outbox_added=self.sender.wake,
            )
            if run_worker and config.worker.enabled
            else None
        )
        self.timer = StabilityTimer(
            config, self.index, metrics=self.metrics, on_jobs_queued=self.worker.wake if self.worker else None
        )
        self.receiver = Receiver(
            config,
            self.store,
            self.index,
            hash_key,
            on_instance_stored=self.timer.notify_instance_stored,
            metrics=self.metrics,
        )
        self.retention = Retention(config, self.index, self.store)
        self.admin = None
        if config.admin.enabled:
            from node.admin_http import AdminServer

            self.admin = AdminServer(self)
        self.maintenance = BackgroundScheduler(timezone="UTC")
        # A partial file outlives its association by at most this long (see remove_stale_incoming).
        stale_after_seconds = config.node.network_timeout_seconds + config.node.dimse_timeout_seconds
        self.maintenance.add_job(
            self.store.remove_stale_incoming,
            "interval",
            seconds=60,
            args=(stale_after_seconds,),
            max_instances=1,
            coalesce=True,
            id="stale-incoming-sweep",
        )
        self.stopped = threading.Event()

    def start(self) -> None:
        """Start every part; the receiver accepts associations when this returns.

        Raises
        ------
        ConfigError
            When the admin endpoint cannot bind its port. Nothing else has started then.
        """
        if self.admin is not None:
            self.admin.start()
        self.store.clean_incoming()
        self.maintenance.start()
        if not self.config.callers:
            log.warning("receiver.any_caller_allowed", reason="no [[callers]] configured; every calling AE title may store")
        if self.worker is not None:
            self.worker.start()
        self.sender.start()
        self.timer.start()
        self.retention.start()
        self.receiver.start()
        log.info(
            "node.ready",
            ae_title=self.config.node.ae_title,
            port=self.receiver.port,
            admin_port=self.admin.port if self.admin is not None else None,
            data_dir=str(self.config.node.data_dir),
            worker=self.worker is not None,
            destinations=[destination.name for destination in self.config.destinations],
            query_sources=[source.name for source in self.config.query_sources],
        )

    def stop(self) -> None:
        """Stop accepting associations, then let the timer, worker and sender finish what is in hand."""
        if self.admin is not None:
            self.admin.stop()
        self.receiver.stop()
        self.maintenance.shutdown(wait=True)
        self.timer.stop()
        self.retention.stop()
        if self.worker is not None:
            self.worker.stop()
        self.sender.stop()
        self.index.dispose()
        self.stopped.set()
        log.info("node.stopped")

    def reload_config(self) -> ReloadResult:
        """Read the configuration file again and apply its callers and destinations.

        The new configuration replaces the old one in the receiver, worker and sender in one
        attribute assignment each, so associations and sends in progress keep running with
        the settings they started with. Changes to other sections are logged and need a restart.

        Raises
        ------
        ConfigError
            When the node has no configuration file or the file is invalid; the running
            configuration then stays as it was.
        """
        if self.config_path is None:
            raise ConfigError("this node was started without a configuration file, so there is nothing to reload")
        with self._reload_lock:
            loaded = load_config(self.config_path)
            restart_needed_for = tuple(
                section
                for section in type(loaded).model_fields
                if section not in RELOADABLE_SECTIONS and getattr(loaded, section) != getattr(self.config, section)
            )
            updated = self.config.model_copy(update={section: getattr(loaded, section) for section in RELOADABLE_SECTIONS})
            for part in (self, self.receiver, self.timer, self.worker, self.sender, self.retention):
                if part is not None:
                    part.config = updated
        result = ReloadResult(
            callers=tuple(caller.ae_title for caller in updated.callers),
            destinations=tuple(destination.name for destination in updated.destinations),
            restart_needed_for=restart_needed_for,
        )
        log.info("node.config_reloaded", config_path=str(self.config_path), **result.as_dict())
        if restart_needed_for:
            log.warning(
                "node.config_restart_needed",
                sections=list(restart_needed_for),
                reason="only [[callers]] and [[destinations]] change without a restart",
            )
        if not updated.callers:
            log.warning("receiver.any_caller_allowed", reason="no [[callers]] configured; every calling AE title may store")
        self.sender.wake()
        return result

    def reload_config_logged(self) -> None:
        """Reload as `reload_config` does, logging an invalid file instead of raising (for SIGHUP)."""
        try:
            self.reload_config()
        except ConfigError as exc:
            log.error("node.config_reload_failed", error=str(exc), config_path=str(self.config_path))


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
