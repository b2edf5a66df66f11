"""The multi-process deployment, tested together: two bot processes behind webhooks (the fake Telegram posts
updates to them in turn, as a load balancer would, with the webhook secret) and one scheduler process, all on
one PostgreSQL database. Updates are split across both bots, each outbox message goes out once although both
bots flush the same outbox, and the scheduler's notices go out once.

The bots run ``python -m bot.bench_e2e serve-bot --webhook …`` (the same ``build_application`` and
``run_webhook`` as ``hotline run --webhook``, with a rule-based triage instead of the model so the processes
start in seconds); the scheduler is the real ``hotline scheduler``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from bot.bench_e2e import prepare_database
from bot.fake_bot_api import FakeBotAPI
from bot.messages import Reply
from bot.outbox import enqueue
from bot.telegram_app import FOLLOW_UP
from models.clock import CHINA_TZ, FakeClock, set_clock
from models.db import make_session_factory
from models.tables import ChatBinding, Notice, OutboxMessage
from tests.conftest import PG_URL
from tests.helpers import dispatched_ticket

pytestmark = pytest.mark.skipif(
    not PG_URL.startswith("postgresql"), reason="needs HOTLINE_TEST_DATABASE_URL=PostgreSQL"
)
ROOT = Path(__file__).resolve().parent.parent
SECRET = "multi-process-secret"
CITIZENS = range(8_100_001, 8_100_021)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
    return value


@pytest.fixture
def database():
    db = prepare_database(PG_URL, Path(tempfile.mkdtemp()))
    engine = create_engine(db.url)
    yield db.url, make_session_factory(engine)
    engine.dispose()
    db.cleanup()


def test_two_webhook_bots_and_a_scheduler_share_one_database(database, tmp_path):
    url, factory = database
    with factory() as s:
        unit_chat = s.scalars(select(ChatBinding.chat_id).where(ChatBinding.unit_code == "chengguan")).one()
    # an urgent ticket dispatched two days ago and never signed: the scheduler must urge the unit, once
    previous = set_clock(FakeClock(datetime.now(CHINA_TZ) - timedelta(days=2)))
    try:
        with factory.begin() as s:
            overdue = dispatched_ticket(s, lead="chengguan", urgent_level="special_urgent").number
    finally:
        set_clock(previous)
    # notices already queued: both bots flush this outbox at the same time
    with factory.begin() as s:
        for i in range(150):  # three claims' worth
            enqueue(
                s, channel="telegram", chat_id=str(-2_000_000 - i), reply=Reply(f"通知 {i}"), kind="notice"
            )
    _sweep_job_due_now(factory)

    api = FakeBotAPI(balance_webhooks=True).start()
    env = {**os.environ, "HOTLINE_DATABASE_URL": url, "HOTLINE_TELEGRAM_BASE_URL": api.base_url}
    procs = []
    try:
        for name in ("bot_a", "bot_b"):
            port = _port()
            cmd = [
                sys.executable,
                "-m",
                "bot.bench_e2e",
                "serve-bot",
                "--db",
                url,
                "--api",
                api.base_url,
                "--brain",
                "stand-in",
                "--webhook",
                f"http://127.0.0.1:{port}/tg",
                "--secret",
                SECRET,
                "--port",
                str(port),
            ]
            procs.append(_spawn(cmd, env, tmp_path / f"{name}.log"))
        procs.append(_spawn([sys.executable, "-m", "bot.cli", "scheduler"], env, tmp_path / "scheduler.log"))
        _wait(lambda: len(api.state.webhook_urls) == 2, 25, "both bots set their webhook")
        # citizens write; each waits for the answer before the next step, as people do
        for chat in CITIZENS:
            api.message(chat, "幸福路的路灯坏了，今天晚上")
        summaries = [api.wait_text(chat, "请确认", timeout=20) for chat in CITIZENS]
        for chat, summary in zip(CITIZENS, summaries, strict=True):
            api.press(chat, dict(summary.buttons())["✅ 确认提交"])
        for chat in CITIZENS:
            api.wait_text(chat, "已受理", timeout=20)
        _wait(lambda: _all_sent(factory), 20, "the outbox drained")
        api.wait_text(unit_chat, overdue, timeout=20)  # the scheduler's urge, delivered by a bot
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        api.stop()

    hits = api.state.webhook_hits
    assert len(hits) == 2 and min(hits.values()) >= 10, f"updates split across both bots: {hits}"
    got = Counter((s.chat_id, s.text) for s in api.sent if s.text != FOLLOW_UP)
    twice = {k: n for k, n in got.items() if n > 1}
    assert not twice, f"delivered more than once: {list(twice)[:3]}"
    with factory() as s:
        rows = s.execute(select(OutboxMessage.chat_id, OutboxMessage.text)).all()
        assert all(got[(r.chat_id, r.text)] == 1 for r in rows), "every outbox message delivered once"
        assert s.scalar(select(func.count()).select_from(Notice)) >= 1
    # a second scheduler pass (another scheduler process, or the next minute) issues nothing new
    from scheduler.sweep import sweep

    with factory() as s:
        before = s.scalar(select(func.count()).select_from(OutboxMessage))
    sweep(factory)
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(OutboxMessage)) == before


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)


def _all_sent(factory) -> bool:
    with factory() as s:
        return not s.scalar(select(func.count()).where(OutboxMessage.status != "sent"))


def _sweep_job_due_now(factory) -> None:
    """Store the scheduler's jobs with the sweep due in two seconds, so the scheduler process sweeps as soon
    as it is up (as after a restart) instead of a minute later. (Not already due: APScheduler looks at due
    jobs once more while shutting down, and would move it on.)"""
    from scheduler.runner import build_scheduler

    scheduler = build_scheduler(factory)
    scheduler.start(paused=True)
    scheduler.modify_job("sweep", next_run_time=datetime.now(CHINA_TZ) + timedelta(seconds=2))
    scheduler.shutdown(wait=False)
