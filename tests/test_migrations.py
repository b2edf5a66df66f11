"""Alembic migrations build exactly the schema of the ORM model, on SQLite and on PostgreSQL."""

from __future__ import annotations

import uuid

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

import models.tables  # noqa: F401
from models.base import Base
from models.migrate import downgrade, upgrade
from tests.conftest import PG_URL


def _fresh_engine(tmp_path):
    if PG_URL.startswith("postgresql"):
        schema = f"mig_{uuid.uuid4().hex[:8]}"
        admin = create_engine(PG_URL)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        eng = create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})

        def cleanup() -> None:
            eng.dispose()
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()

        return eng, cleanup
    eng = create_engine(f"sqlite:///{tmp_path / 'mig.db'}")
    return eng, eng.dispose


def test_migrations_match_the_model_and_downgrade_cleanly(tmp_path):
    engine, cleanup = _fresh_engine(tmp_path)
    try:
        upgrade(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"model and migrations differ: {diff}"
        assert {"tickets", "ticket_events", "units", "outbox", "kb_entries"} <= set(
            inspect(engine).get_table_names()
        )
        downgrade(engine, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        cleanup()
