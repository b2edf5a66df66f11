"""Engine and session factory for the configured database (SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from models.settings import get_settings


def make_engine(url: str | None = None, *, pre_ping: bool = True) -> Engine:
    """``pre_ping``: test each pooled connection with a round trip before handing it out (a database restart
    then costs nothing). The Telegram channel turns it off (issue 8): every one of its transactions is run
    again when its connection turns out dead (``bot.inbox.with_db_retry``; the first failure discards the
    whole pool), and under load the pings were a round trip per transaction, several per update."""
    settings = get_settings()
    url = url or settings.effective_database_url
    if url.startswith("sqlite:///"):
        from pathlib import Path

        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # a step may hold two connections at once (its transaction and the ticket number's, models.workflow
    # ._next_number): SQLAlchemy's default 5 + 10 could leave a busy bot's steps waiting for one another
    if make_url(url).get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=pre_ping, pool_size=10, max_overflow=20)
    return create_engine(url, pool_pre_ping=pre_ping)


def conflict_insert(session: Session):
    """The database's ``insert`` construct that knows ON CONFLICT (PostgreSQL, SQLite), or None for another
    database (whose callers fall back to a savepoint or a read first)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert

        return insert
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert

        return insert
    return None


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
