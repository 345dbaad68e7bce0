"""Index schema migrations: each revision upgrades and downgrades without losing rows."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from node.index import schema
from node.index.models import Base
from node.index.session import IndexDatabase


@pytest.fixture
def index(tmp_path):
    database = IndexDatabase(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    yield database
    database.dispose()


def _study_columns(index: IndexDatabase) -> set[str]:
    return {column["name"] for column in inspect(index.engine).get_columns("studies")}


def _insert_study(index: IndexDatabase) -> None:
    with index.engine.begin() as connection:
        connection.execute(
            text("INSERT INTO patients (id, patient_id, issuer_of_patient_id, patient_hash) VALUES (1, 'P1', '', 'h')")
        )
        connection.execute(
            text(
                "INSERT INTO studies (id, study_instance_uid, patient_fk, patient_name, study_date, study_time, "
                "accession_number, study_description, state, state_reason, first_received_at, last_received_at, "
                "instance_count, frontal_reason) VALUES (1, '1.2.3', 1, '', '20200101', '', '', '', 'sent', '', "
                "'2020-01-01 00:00:00', '2020-01-01 00:00:00', 1, '')"
            )
        )


def test_schema_0002_adds_retrieved_from(index):
    schema.upgrade(index.engine, "0001")
    _insert_study(index)
    assert "retrieved_from" not in _study_columns(index)

    schema.upgrade(index.engine)
    assert schema.current_revision(index.engine) == "0002"
    with index.engine.connect() as connection:
        rows = connection.execute(text("SELECT study_instance_uid, retrieved_from FROM studies")).all()
    assert rows == [("1.2.3", None)]


def test_schema_0002_downgrade_keeps_rows(index):
    schema.upgrade(index.engine)
    _insert_study(index)
    schema.downgrade(index.engine, "0001")
    assert schema.current_revision(index.engine) == "0001"
    assert "retrieved_from" not in _study_columns(index)
    with index.engine.connect() as connection:
        assert connection.execute(text("SELECT study_instance_uid FROM studies")).scalars().all() == ["1.2.3"]


def test_schema_head_matches_models(index):
    schema.upgrade(index.engine)
    with index.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
