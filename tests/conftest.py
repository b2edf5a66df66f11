"""Shared fixtures.

The database under test is SQLite by default; set HOTLINE_TEST_DATABASE_URL to a PostgreSQL URL
(``postgresql+psycopg://postgres@127.0.0.1:5432/test``) to run the same suite there. Each pytest
process works in its own PostgreSQL schema, so parallel runs never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import datetime

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from models.clock import CHINA_TZ, FakeClock, set_clock

PG_URL = os.environ.get("HOTLINE_TEST_DATABASE_URL", "")


def _all_tables():
    import models.tables  # noqa: F401  registers every table on Base.metadata
    from models.base import Base

    return Base.metadata


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    metadata = _all_tables()
    if PG_URL.startswith("postgresql"):
        schema = f"t_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        admin = create_engine(PG_URL)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        eng = create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"}, pool_pre_ping=True)
        metadata.create_all(eng)
        eng.hotline_schema = schema  # type: ignore[attr-defined]
        yield eng
        eng.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    else:
        from models.db import make_engine

        path = tmp_path_factory.mktemp("db") / "hotline.db"
        eng = make_engine(f"sqlite:///{path}")
        metadata.create_all(eng)
        yield eng
        eng.dispose()


@pytest.fixture
def db(engine) -> Iterator[sessionmaker[Session]]:
    """A session factory on an empty database (all tables, no rows)."""
    metadata = _all_tables()
    with engine.begin() as conn:
        # DELETE beats TRUNCATE on PostgreSQL for a few rows in many tables
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
    yield sessionmaker(engine, expire_on_commit=False)


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    """A controllable clock installed for the whole product; starts Monday 2026-11-23 09:00 China time."""
    fake = FakeClock(datetime(2026, 11, 23, 9, 0, tzinfo=CHINA_TZ))
    previous = set_clock(fake)
    yield fake
    set_clock(previous)
