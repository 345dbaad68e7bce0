"""Index schema migrations on SQLite and PostgreSQL: upgrade, step by step, and back one step."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from node.config import parse_config
from node.index import schema
from node.index.models import Base
from node.index.session import IndexDatabase
from node.service import NodeService
from tests.peers import postgres_database


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path):
    if request.param == "sqlite":
        database = IndexDatabase(f"sqlite:///{tmp_path / 'index.sqlite3'}")
        yield database
        database.dispose()
        return
    with postgres_database() as url:
        database = IndexDatabase(url)
        schema.downgrade(database.engine, "base")
        yield database
        database.dispose()


def _revisions_oldest_first() -> list[str]:
    script = ScriptDirectory(str(schema.MIGRATIONS_DIR))
    return [revision.revision for revision in reversed(list(script.walk_revisions()))]


def test_schema_upgrade_from_empty_matches_models(empty_database):
    schema.upgrade(empty_database.engine)
    assert schema.current_revision(empty_database.engine) == schema.head_revision()
    tables = set(inspect(empty_database.engine).get_table_names()) - {"alembic_version"}
    assert tables == set(Base.metadata.tables)
    for table in Base.metadata.tables.values():
        columns = {column["name"] for column in inspect(empty_database.engine).get_columns(table.name)}
        assert columns == set(table.columns.keys()), table.name


def test_schema_upgrade_each_revision_from_previous(empty_database):
    for revision in _revisions_oldest_first():
        schema.upgrade(empty_database.engine, revision)
        assert schema.current_revision(empty_database.engine) == revision


def test_schema_downgrade_one_step(empty_database):
    revisions = _revisions_oldest_first()
    schema.upgrade(empty_database.engine)
    schema.downgrade(empty_database.engine, "-1")
    expected = revisions[-2] if len(revisions) > 1 else None
    assert schema.current_revision(empty_database.engine) == expected


def test_node_refuses_outdated_schema(empty_database, tmp_path):
    revisions = _revisions_oldest_first()
    if len(revisions) > 1:
        schema.upgrade(empty_database.engine, revisions[-2])
    else:
        empty_database.engine.connect().close()
        schema.upgrade(empty_database.engine)
        schema.downgrade(empty_database.engine, "base")
        # An unversioned database that contains a table is not empty, so it is not created over.
        with empty_database.engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE unrelated (id INTEGER)")
    config = parse_config(
        {"node": {"data_dir": str(tmp_path / "node"), "database_url": empty_database.url.render_as_string(hide_password=False), "port": 1}}
    )
    with pytest.raises(schema.SchemaOutdatedError, match="libra-node db upgrade"):
        NodeService(config)


def _insert_study(database: IndexDatabase) -> None:
    with database.engine.begin() as connection:
        connection.execute(
            text("INSERT INTO patients (id, patient_id, issuer_of_patient_id, patient_hash) VALUES (1, 'P1', '', 'h')")
        )
        connection.execute(
            text(
                "INSERT INTO studies (id, study_instance_uid, patient_fk, patient_name, study_date, study_time, "
                "accession_number, study_description, state, state_reason, first_received_at, last_received_at, "
                "instance_count, frontal_reason) VALUES (1, '1.2.3', 1, '', '20200101', '', '', '', 'sent', '', "
                "'2020-01-01 00:00:00+00', '2020-01-01 00:00:00+00', 1, '')"
            )
        )


def _study_columns(database: IndexDatabase) -> set[str]:
    return {column["name"] for column in inspect(database.engine).get_columns("studies")}


def test_schema_0003_adds_retrieved_from_keeping_rows(empty_database):
    schema.upgrade(empty_database.engine, "0002_removed_files")
    _insert_study(empty_database)
    assert "retrieved_from" not in _study_columns(empty_database)

    schema.upgrade(empty_database.engine, "0003")
    with empty_database.engine.connect() as connection:
        rows = connection.execute(text("SELECT study_instance_uid, retrieved_from FROM studies")).all()
    assert rows == [("1.2.3", None)]


def test_schema_0003_downgrade_keeps_rows(empty_database):
    schema.upgrade(empty_database.engine, "0003")
    _insert_study(empty_database)
    schema.downgrade(empty_database.engine, "0002_removed_files")
    assert "retrieved_from" not in _study_columns(empty_database)
    with empty_database.engine.connect() as connection:
        assert connection.execute(text("SELECT study_instance_uid FROM studies")).scalars().all() == ["1.2.3"]


def test_schema_head_has_no_autogenerate_differences(empty_database):
    schema.upgrade(empty_database.engine)
    with empty_database.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
