"""The scheduler process: APScheduler 3 with a persistent SQLAlchemy job store (same database by default).

Jobs (module-level functions, so the job store can keep a reference to them):

* ``sweep_job`` every minute: scheduler.sweep.sweep (reminders, cards, supervision, surveys);
* ``morning_digest_job`` at 08:30 every working day: per unit, what is overdue / due today / due soon;
* ``weekly_report_job`` Monday 09:00: last week's report to the center group (text + PNG chart);
* ``monthly_report_job`` the 1st at 09:30: last month's report (宿政办发〔2020〕55号 第十三条 月报).

Runs inside ``hotline run`` (``attach_to_application``) or alone (``run_forever`` for ``hotline scheduler``).
Missed runs: every job coalesces, and a job whose time passed while the process was down runs once at
start within its grace time; the sweep never needs it (it always catches up on everything due). Two
scheduler processes may share the job store: the sweep acts once per notice, the digests and reports have
outbox dedupe keys, so nothing is sent twice.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine, create_engine, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from models.clock import CHINA_TZ, now

log = logging.getLogger(__name__)

JOB_TABLE = "apscheduler_jobs"
_factory: sessionmaker[Session] | None = None
_factory_lock = threading.Lock()


# --------------------------------------------------------------------------- the jobs


def set_factory(factory: sessionmaker[Session] | None) -> None:
    """The session factory the jobs use in this process (None: build one from the settings)."""
    global _factory
    _factory = factory


def get_factory() -> sessionmaker[Session]:
    global _factory
    with _factory_lock:
        if _factory is None:
            from models.db import make_engine, make_session_factory

            _factory = make_session_factory(make_engine())
    return _factory


def sweep_job() -> dict:
    from scheduler.sweep import sweep

    return sweep(get_factory()).as_dict()


def morning_digest_job() -> int:
    from models.workcalendar import get_calendar
    from scheduler.digest import morning_digest

    today = now().astimezone(CHINA_TZ).date()
    if not get_calendar().is_workday(today):
        return 0
    with get_factory().begin() as session:
        return morning_digest(session, today)


def send_period_report(
    period: str, factory: sessionmaker[Session] | None = None, *, out_dir: Path | None = None
) -> list[Path]:
    """Build last week's / month's report, write its files and queue it for the center group."""
    from models.settings import get_settings
    from scheduler.reports import period_bounds, post_report, weekly_report, write_files

    factory = factory or get_factory()
    start, end = period_bounds(period, now().astimezone(CHINA_TZ).date())
    out_dir = out_dir or get_settings().data_dir / "reports"
    with factory.begin() as session:
        report = weekly_report(session, start, end, period=period)
        paths = write_files(report, out_dir)
        post_report(session, report, paths[0])
    log.info("%s report %s – %s written to %s", period, start.date(), end.date(), out_dir)
    return paths


def weekly_report_job() -> list[str]:
    return [str(p) for p in send_period_report("week")]


def monthly_report_job() -> list[str]:
    return [str(p) for p in send_period_report("month")]


@dataclass(frozen=True)
class JobSpec:
    id: str
    func: Callable[[], Any]
    trigger: Any
    grace: int  # seconds a late run is still worth doing


def job_specs() -> list[JobSpec]:
    return [
        JobSpec("sweep", sweep_job, IntervalTrigger(minutes=1, timezone=CHINA_TZ), 300),
        JobSpec(
            "morning_digest", morning_digest_job, CronTrigger(hour=8, minute=30, timezone=CHINA_TZ), 3 * 3600
        ),
        JobSpec(
            "weekly_report",
            weekly_report_job,
            CronTrigger(day_of_week="mon", hour=9, minute=0, timezone=CHINA_TZ),
            24 * 3600,
        ),
        JobSpec(
            "monthly_report",
            monthly_report_job,
            CronTrigger(day=1, hour=9, minute=30, timezone=CHINA_TZ),
            24 * 3600,
        ),
    ]


# --------------------------------------------------------------------------- the scheduler


def _stored_jobs(engine: Engine) -> dict[str, tuple[str, str]]:
    """Job id → (function reference, trigger) already in the job store."""
    if not inspect(engine).has_table(JOB_TABLE):
        return {}
    from sqlalchemy import Column, LargeBinary, MetaData, Table, Unicode

    table = Table(JOB_TABLE, MetaData(), Column("id", Unicode(191)), Column("job_state", LargeBinary))
    out: dict[str, tuple[str, str]] = {}
    with engine.connect() as conn:
        for job_id, state in conn.execute(select(table.c.id, table.c.job_state)):
            try:
                data = pickle.loads(state)
                out[job_id] = (str(data.get("func")), str(data.get("trigger")))
            except Exception:  # an unreadable row is replaced
                out[job_id] = ("", "")
    return out


def build_scheduler(
    factory: sessionmaker[Session], *, jobstore_url: str | None = None
) -> BackgroundScheduler:
    """A background scheduler (not started) whose jobs live in ``jobstore_url`` (default: the product's own
    database). Jobs already stored with the same function and trigger are kept as they are, so a restart
    keeps their next run time (and a report missed while down runs at start, within its grace time)."""
    set_factory(factory)
    if jobstore_url:
        engine = create_engine(jobstore_url)
    else:
        engine = factory.kw["bind"]
    store = SQLAlchemyJobStore(engine=engine, tablename=JOB_TABLE)
    scheduler = BackgroundScheduler(
        jobstores={"default": store},
        executors={"default": ThreadPoolExecutor(max_workers=2)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 300},
        timezone=CHINA_TZ,
    )
    stored = _stored_jobs(engine)
    for spec in job_specs():
        ref = f"{spec.func.__module__}:{spec.func.__qualname__}"
        if stored.get(spec.id) == (ref, str(spec.trigger)):
            continue
        scheduler.add_job(
            spec.func,
            spec.trigger,
            id=spec.id,
            name=spec.id,
            replace_existing=True,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=spec.grace,
        )
    return scheduler


def run_forever(factory: sessionmaker[Session]) -> int:
    """`hotline scheduler`: run the jobs until SIGINT/SIGTERM."""
    scheduler = build_scheduler(factory)
    stop = threading.Event()

    def _stop(signum, _frame) -> None:
        log.info("scheduler: signal %s, stopping", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    scheduler.start()
    for job in scheduler.get_jobs():
        log.info("scheduler: %s next at %s", job.id, job.next_run_time)
    try:
        while not stop.wait(3600):
            pass
    finally:
        scheduler.shutdown(wait=True)
    return 0


def attach_to_application(app: Any, factory: sessionmaker[Session]) -> None:
    """Start the scheduler with a python-telegram-bot Application and stop it with the application
    (chains any post_init / post_shutdown hooks already set)."""
    previous_init = getattr(app, "post_init", None)
    previous_shutdown = getattr(app, "post_shutdown", None)
    holder: dict[str, BackgroundScheduler] = {}

    async def post_init(application: Any) -> None:
        if previous_init is not None:
            await previous_init(application)
        scheduler = build_scheduler(factory)
        scheduler.start()
        holder["scheduler"] = scheduler
        log.info("scheduler started with the bot")

    async def post_shutdown(application: Any) -> None:
        scheduler = holder.pop("scheduler", None)
        if scheduler is not None:
            await asyncio.get_running_loop().run_in_executor(None, scheduler.shutdown)
            log.info("scheduler stopped")
        if previous_shutdown is not None:
            await previous_shutdown(application)

    app.post_init = post_init
    app.post_shutdown = post_shutdown
