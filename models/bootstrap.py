"""Opening the product's database: migrate to the newest schema and load the unit catalog once."""

from __future__ import annotations

import logging

from sqlalchemy import Engine, inspect
from sqlalchemy.orm import Session, sessionmaker

from models.catalog import load_catalog
from models.db import make_engine, make_session_factory, session_scope
from models.migrate import upgrade

log = logging.getLogger(__name__)


def init_database(engine: Engine, *, seed_kb: bool = True) -> dict[str, int]:
    """Bring the schema to the newest migration and load the catalog (idempotent)."""
    upgrade(engine)
    factory = make_session_factory(engine)
    stats = {"units_changed": 0, "kb_loaded": 0}
    with session_scope(factory) as session:
        stats["units_changed"] = load_catalog(session)
        if seed_kb:
            try:
                from kb.io import load_seed
            except ImportError:  # pragma: no cover - kb is part of the product
                load_seed = None
            if load_seed is not None:
                stats["kb_loaded"] = len(load_seed(session).created)
    return stats


def open_database(
    url: str | None = None, *, init: bool = True, pre_ping: bool = True
) -> tuple[Engine, sessionmaker[Session]]:
    """The engine and session factory for the configured database, initialised on first run."""
    engine = make_engine(url, pre_ping=pre_ping)
    if init and "units" not in inspect(engine).get_table_names():
        log.info("first run: creating the database and loading the unit catalog")
        init_database(engine)
    elif init:
        upgrade(engine)
    return engine, make_session_factory(engine)
