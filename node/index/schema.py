"""Schema versions of the index, managed with Alembic.

`upgrade` brings a database to the newest revision (`libra-node db upgrade`). At start the node
calls `check_schema_current`, which refuses a database whose schema is behind the code.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class SchemaOutdatedError(RuntimeError):
    """The database's schema revision is not the one this version of the node needs."""


def _alembic_config(engine: Engine, connection=None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """Return the newest revision in the migrations folder."""
    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """Return the database's revision, or None when it has never been migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to `revision` (the newest by default)."""
    with engine.begin() as connection:
        command.upgrade(_alembic_config(engine, connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Revert migrations down to `revision` (for example "-1" for one step)."""
    with engine.begin() as connection:
        command.downgrade(_alembic_config(engine, connection), revision)


def is_empty(engine: Engine) -> bool:
    """Return True when the database contains no tables at all."""
    return not inspect(engine).get_table_names()


def check_schema_current(engine: Engine) -> None:
    """Raise SchemaOutdatedError unless the database is at the newest revision.

    The message names the revisions and the command that upgrades the database.
    """
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None:
        state = "has no libra-node schema"
    else:
        state = f"is at schema revision {current}"
    raise SchemaOutdatedError(
        f"the index database {engine.url.render_as_string(hide_password=True)} {state}; this node needs "
        f"revision {head}. Back up the database, then run 'libra-node db upgrade --config FILE'."
    )
