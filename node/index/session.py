"""Database engine and sessions for the index (SQLite by default, PostgreSQL for several machines).

SQLite runs in WAL mode with a busy timeout, and every write transaction starts with
BEGIN IMMEDIATE, so concurrent writers queue for the lock instead of failing with
"database is locked" when a reader upgrades to a writer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import structlog
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from node.index import schema
from node.index.models import AuditEvent
from node.store import make_private_directory

log = structlog.get_logger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, connection_record):
        # The driver's own transaction handling is turned off so that "begin" below decides.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class IndexNotFoundError(RuntimeError):
    """The SQLite index file does not exist at the path the configuration names."""


class IndexDatabase:
    """The index's engine and session factory.

    Parameters
    ----------
    url
        SQLAlchemy URL, for example ``sqlite:////var/lib/libra/index.sqlite3`` or
        ``postgresql+psycopg://node@db/libra``.
    create_file
        Whether a missing SQLite file is created (False for tools that only read an index:
        they raise IndexNotFoundError instead).
    create_file
        Whether a missing SQLite file is created (False for tools that only read an index:
        they raise IndexNotFoundError instead).
    """

    def __init__(self, url: str, create_file: bool = True) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite and self.url.database:
            database_path = Path(self.url.database)
            if not create_file and not database_path.exists():
                raise IndexNotFoundError(
                    f"no index database at {database_path}: check that --config names the node's configuration "
                    f"file (its data_dir), or start the node once to create the index"
                )
            make_private_directory(database_path.parent)
            if not database_path.exists():
                # Created here so that the index is readable by the node's user only.
                os.close(os.open(database_path, os.O_CREAT | os.O_WRONLY, 0o600))
            self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            _configure_sqlite(self.engine)
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def prepare_schema(self, create_if_empty: bool) -> None:
        """Check that the schema is current, first creating it in an empty database if allowed.

        Raises
        ------
        SchemaOutdatedError
            When the schema is behind the code (or absent and not to be created); the message
            names `libra-node db upgrade`.
        """
        if create_if_empty and schema.is_empty(self.engine):
            schema.upgrade(self.engine)
            log.info("index.schema_created", revision=schema.head_revision())
        schema.check_schema_current(self.engine)

    def upgrade_schema(self) -> None:
        """Apply every pending migration (what `libra-node db upgrade` runs)."""
        schema.upgrade(self.engine)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """Yield a session inside one transaction, committed on exit and rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        """Close all pooled connections."""
        self.engine.dispose()


def record_audit(
    session: Session,
    *,
    entity: str,
    entity_id: int,
    to_state: str,
    actor: str,
    from_state: str = "",
    reason: str = "",
    study_instance_uid: str = "",
) -> None:
    """Add an audit row for a state change to the session's transaction."""
    session.add(
        AuditEvent(
            entity=entity,
            entity_id=entity_id,
            from_state=from_state,
            to_state=to_state,
            actor=actor,
            reason=reason,
            study_instance_uid=study_instance_uid,
        )
    )
