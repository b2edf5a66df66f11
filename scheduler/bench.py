"""`hotline bench sweep`: time one deadline sweep over many open tickets (target: 100,000 in ≤ 1 s).

The tickets are bulk-inserted with SQLAlchemy Core (executemany) into a throwaway database — a temporary
SQLite file, or a temporary schema in the PostgreSQL database given by ``url`` that is dropped afterwards —
with deadlines spread over the coming weeks like a live hotline's: most not due, a few due now (so the
sweep has real work), and some overdue tickets that were already red-carded (so the sweep must skip them
without acting). Two sweeps are timed: the first, which acts on what is due, and a second one at the same
moment, the steady state of a sweep every minute.

    python -m scheduler.bench [--n 100000] [--url postgresql+psycopg://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, insert, text
from sqlalchemy.orm import sessionmaker

from models.clock import CHINA_TZ, FakeClock, set_clock

DUE_NOW = 5  # tickets of each kind that have come due at the bench's "now" (6 kinds: 30 due)


def _rows(n: int, at: datetime, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """n open tickets: 10% waiting to be signed, 80% being handled, 10% replied and waiting for a rating."""
    tickets: list[dict] = []
    notices: list[dict] = []
    units = ["chengguan", "zhujian", "shengtai", "gongan", "renshe"]
    already_red = n // 100  # overdue tickets red-carded by an earlier sweep
    for i in range(1, n + 1):
        created = at - timedelta(hours=rng.uniform(1, 24 * 20))
        row = {
            "id": i,
            "number": f"B{i:09d}",
            "channel": "telegram",
            "policy": "quxian",
            "original_text": "bench",
            "summary": "bench",
            "type": "complaint",
            "urgent": False,
            "lead_unit": units[i % len(units)],
            "supervised": False,
            "overdue": False,
            "terminal": False,
            "created_at": created,
            "dispatched_at": created,
            "clock_start": created,
            "extension_count": 0,
            "return_count": 0,
            "redo_count": 0,
            "urge_count": 0,
            "overdue_count": 0,
            "sign_due": None,
            "finish_due": None,
            "yellow_at": None,
            "replied_at": None,
            "survey_due": None,
        }
        r = i % 10
        ahead = timedelta(hours=rng.uniform(1, 24 * 15))
        if r == 0:  # dispatched, not yet signed
            row["status"] = "dispatched"
            row["sign_due"] = at + ahead
            row["finish_due"] = at + ahead + timedelta(days=5)
            row["yellow_at"] = at + ahead + timedelta(days=3)
        elif r == 1:  # replied, survey open
            row["status"] = "replied"
            row["replied_at"] = at - timedelta(hours=rng.uniform(0.1, 20))
            row["survey_due"] = row["replied_at"] + timedelta(days=3)
            row["finish_due"] = row["replied_at"]
        else:  # being handled
            row["status"] = "signed"
            row["sign_due"] = created + timedelta(days=1)
            row["finish_due"] = at + ahead
            row["yellow_at"] = at + ahead * 0.6
        tickets.append(row)
    # a few of each kind come due now
    handled = [t for t in tickets if t["status"] == "signed"]
    for t in handled[:DUE_NOW]:
        t["finish_due"] = at - timedelta(minutes=rng.uniform(1, 30))
    for t in handled[DUE_NOW : 2 * DUE_NOW]:
        t["yellow_at"] = at - timedelta(minutes=rng.uniform(1, 30))
    for t in [t for t in tickets if t["status"] == "dispatched"][:DUE_NOW]:
        t["sign_due"] = at - timedelta(minutes=rng.uniform(1, 30))
    replied = [t for t in tickets if t["status"] == "replied"]
    for t in replied[:DUE_NOW]:
        t["replied_at"] = at - timedelta(hours=30)
        t["survey_due"] = t["replied_at"] + timedelta(days=3)
    for t in replied[DUE_NOW : 2 * DUE_NOW]:
        t["survey_due"] = at - timedelta(minutes=5)
        t["replied_at"] = t["survey_due"] - timedelta(days=3)
    # overdue for days, already red-carded: candidates by deadline that the sweep must skip
    for t in handled[2 * DUE_NOW : 2 * DUE_NOW + already_red]:
        t["finish_due"] = at - timedelta(days=rng.uniform(1, 10))
        t["overdue"] = True
        notices.append(
            {
                "ticket_id": t["id"],
                "kind": "red",
                "key": t["finish_due"].strftime("%Y-%m-%dT%H:%M:%S"),
                "unit_code": t["lead_unit"],
                "at": t["finish_due"] + timedelta(minutes=1),
            }
        )
    return tickets, notices


def bench_sweep(n: int = 100_000, url: str | None = None, *, seed: int = 7) -> dict:
    """Insert ``n`` open tickets into a throwaway database and time a sweep; returns the numbers."""
    import models.tables  # noqa: F401
    from models.base import Base
    from models.db import make_engine
    from models.tables import ChatBinding, Notice, Ticket, Unit
    from models.workcalendar import get_calendar
    from scheduler.sweep import _survey_bounds, sweep

    at = datetime(2026, 11, 25, 10, 0, tzinfo=CHINA_TZ)  # a Wednesday morning: no quiet hours
    previous_clock = set_clock(FakeClock(at))
    tmpdir = None
    schema = None
    admin = None
    if url and url.startswith("postgresql"):
        schema = f"bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        admin = create_engine(url)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        engine = create_engine(url, connect_args={"options": f"-csearch_path={schema}"})
        backend = "postgresql"
    else:
        tmpdir = tempfile.TemporaryDirectory(prefix="hotline-bench-")
        engine = make_engine(url or f"sqlite:///{Path(tmpdir.name) / 'bench.db'}")
        backend = engine.dialect.name
    try:
        Base.metadata.create_all(engine)
        tickets, notices = _rows(n, at, random.Random(seed))
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(
                insert(Unit),
                [
                    {"code": c, "name": c, "level": 2, "duties": "", "active": True}
                    for c in ("center", "chengguan", "zhujian", "shengtai", "gongan", "renshe")
                ],
            )
            conn.execute(
                insert(ChatBinding),
                [
                    {"chat_id": -1000 - i, "unit_code": c, "bound_at": at}
                    for i, c in enumerate(("center", "chengguan", "zhujian", "shengtai", "gongan", "renshe"))
                ],
            )
            for lo in range(0, len(tickets), 5000):
                conn.execute(insert(Ticket), tickets[lo : lo + 5000])
            if notices:
                conn.execute(insert(Notice), notices)
        insert_seconds = time.perf_counter() - started
        if backend == "postgresql":
            with engine.begin() as conn:
                conn.execute(text("ANALYZE"))
        factory = sessionmaker(engine, expire_on_commit=False)
        # what a running scheduler has loaded once per process (policy presets, holiday calendar)
        warm_started = time.perf_counter()
        _survey_bounds()
        get_calendar()
        warmup_seconds = time.perf_counter() - warm_started
        first = sweep(factory)
        second = sweep(factory)
        return {
            "backend": backend,
            "open_tickets": n,
            "insert_seconds": round(insert_seconds, 2),
            "process_warmup_seconds": round(warmup_seconds, 3),
            "first_sweep_seconds": round(first.seconds, 3),
            "first_sweep_acted": first.acted,
            "first_sweep": {
                k: getattr(first, k)
                for k in ("urged", "yellow", "red", "escalations", "survey_reminders", "surveys_expired")
            },
            "steady_sweep_seconds": round(second.seconds, 3),
            "steady_sweep_acted": second.acted,
        }
    finally:
        set_clock(previous_clock)
        engine.dispose()
        if admin is not None:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()
        if tmpdir is not None:
            tmpdir.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--url", default=None, help="database URL (default: a temporary SQLite file)")
    args = parser.parse_args(argv)
    print(json.dumps(bench_sweep(args.n, args.url), ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
