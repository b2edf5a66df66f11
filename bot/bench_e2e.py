"""`hotline bench e2e`: many simulated citizens through the whole stack, with faults, and a proof that nothing
was lost or done twice.

Three processes on 127.0.0.1: the fake Telegram Bot API (``python -m bot.fake_bot_api``), the bot (the real
python-telegram-bot application of bot/telegram_app.py, long-polling the fake server; started by this module's
``serve-bot`` entry so it can be killed and restarted), and this driver, which plays the citizens through the
fake server's ``/control/`` endpoints. Latencies are the fake server's own clock: from the moment a citizen's
update is available to the bot to the bot's first message to that chat.

Citizens write realistic hotline messages (templates below, with variations; some emergencies), answer the
bot's questions (place, time, contact), press the confirm button of the summary or "解决了" under a knowledge
base answer, then write their second message. They pause 1.5-3 s between steps, as people do, which also keeps
them under the bot's flood guard.

``mix="flood"`` plays the other half of a hotline's worst day: everyone writes at once and nobody goes on.
Citizens send their messages, each after the bot's answer to the one before, and press no button, share no
contact or place: every update is a text message, most of them new requests that need the triage model.

Faults (``faults=True``), after a clean stretch used for the throughput and latency figures: Telegram answers
500, then 429 with retry_after, then slowly (1.5 s) and with 504 time-outs; the bot's PostgreSQL connections
are terminated (``pg_terminate_backend``; twice, 1.5 s apart); then, for 3 s, every connection the bot
opens is terminated as soon as it appears (the database restarting, as the bot sees it); the bot process
is killed with SIGKILL and started again. Afterwards the run waits (within ``duration_cap_s``) for the outbox to drain and checks:
every citizen update answered or still queued; every confirmation one ticket, holding what the confirmed
summary showed (a citizen whose reply was held up by a fault may write the next message before answering the
bot, and that message then answers the bot's question or is added to the request awaiting confirmation; such
confirmations are counted in ``tickets.confirmed_content_not_last_message``); every outbox message delivered
once (the fake server's sends compared with the outbox rows by chat and text).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot import texts

log = logging.getLogger(__name__)

TOKEN = "100001:BENCH-TOKEN"
BOT_APP_NAME = "hotline-bench-bot"
TRIAGE_KEY = "hotline-bench-triage"
ROOT = Path(__file__).resolve().parent.parent
KILL_WINDOW_S = 1.0  # a double send whose first copy left this long before the SIGKILL counts as "at kill"
DB_OUTAGE_S = 3.0  # the "db_outage" fault: how long every connection of the bot is cut as soon as it appears
REPLY_TIMEOUT = 20.0  # a citizen who hears nothing for this long stops waiting (checked again at the end)
FOLLOW_UP = "也可以点按钮："  # the second message of a reply that carries two keyboards
QUEUED = texts.QUEUED  # "received, please wait": a first reply, but not yet the answer

# --------------------------------------------------------------------------- what citizens write

PLACES = [
    "幸福路与建设路交叉口",
    "人民路88号",
    "城南新区锦绣花园3栋",
    "东门菜市场",
    "滨河公园北门",
    "实验小学门口",
    "长青小区12栋",
    "火车站广场",
    "开发区工业园二期",
    "老城区解放街",
    "北山路公交站",
    "文化广场东侧",
]
WHEN = ["今天早上", "昨天晚上", "这几天", "上周开始", "最近一个月", "每天晚上十点以后"]

# (kind, template); {p} place, {w} when, {n} a number. Written for this benchmark.
TEMPLATES: list[tuple[str, str]] = [
    ("report", "{p}的路灯{w}一直不亮，晚上走路看不清，希望尽快修一下"),
    ("report", "{w}{p}有工地连夜施工，噪音特别大，孩子没法睡觉"),
    ("report", "{p}门口的烧烤摊{w}都占道经营，油烟很大，行人只能走机动车道"),
    ("report", "{p}的垃圾桶{w}都没人清运，已经堆满了，气味很难闻"),
    ("report", "{p}{w}停水了，物业说不清楚原因，请问什么时候能恢复供水"),
    ("report", "{p}的一个井盖{w}破了个大洞，已经有电动车摔倒，请派人处理"),
    ("report", "我在{p}附近的工地干活，老板拖欠我们{n}个月工资一直不给"),
    ("report", "{p}的电梯{w}坏了好几次，物业拖着不修，老人上下楼很困难"),
    ("report", "在{p}的超市买到过期{n}天的牛奶，商家不肯退换"),
    ("report", "{p}有商户把污水直接排到河里，{w}河水发黑发臭"),
    ("report", "{p}路口的红绿灯{w}不工作，上下班高峰很乱"),
    ("report", "小区楼下{w}总有人遛狗不拴绳，还不清理粪便，希望管一管"),
    ("report", "{w}我家楼上装修，早上七点就开始砸墙，跟物业反映了没用"),
    ("suggestion", "建议在{p}增设一个公交站点，附近居民出行很不方便"),
    ("consult", "居住证怎么办理？需要带哪些材料"),
    ("consult", "公积金提取需要什么手续？"),
    ("consult", "灵活就业人员的社保怎么缴费？"),
    ("consult", "新生儿怎么办理医保参保？"),
    ("consult", "营业执照变更经营范围要去哪里办"),
    ("emergency", "{p}着火了，浓烟很大，里面好像还有人"),
    ("emergency", "有人在{p}晕倒了，叫不醒，快来人"),
    ("emergency", "{p}刚发生车祸，有人受伤倒在地上"),
    ("emergency", "有人拿着刀在{p}抢东西，快来人"),
]
EMERGENCY_SHARE = 0.08
MIXES = ("conversations", "flood")


def make_messages(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """``n`` distinct messages for one citizen: mostly reports and questions, sometimes an emergency."""
    out: list[tuple[str, str]] = []
    normal = [t for t in TEMPLATES if t[0] != "emergency"]
    emergencies = [t for t in TEMPLATES if t[0] == "emergency"]
    while len(out) < n:
        kind, template = rng.choice(emergencies if rng.random() < EMERGENCY_SHARE else normal)
        text = template.format(p=rng.choice(PLACES), w=rng.choice(WHEN), n=rng.randint(2, 9))
        if rng.random() < 0.3:
            text += rng.choice(["，谢谢！", "。麻烦尽快处理。", "，已经不是第一次了。", "！"])
        if all(text != t for _, t in out):
            out.append((kind, text))
    return out


# --------------------------------------------------------------------------- a citizen


@dataclass
class Waiting:
    update_id: int
    at: float  # server time the update became available
    what: str  # message | press | contact | location
    emergency: bool
    local: float  # driver time it was sent


@dataclass
class Citizen:
    chat: int
    messages: list[tuple[str, str]]
    start: float
    rng: random.Random
    index: int = -1  # which message is being handled
    state: str = "new"  # new | waiting | thinking | done
    waiting: Waiting | None = None
    act_at: float = 0.0
    heard: list[dict[str, Any]] = field(default_factory=list)  # the bot's messages since the last action
    steps: int = 0
    resend: dict[str, Any] | None = None  # an update refused by the flood guard, to try again
    last_update: dict[str, Any] | None = None
    answers: bool = True  # False (mix "flood"): sends its messages and answers none of the bot's questions
    confirmed: str | None = None  # the content of the summary whose confirm button it pressed last

    @property
    def text(self) -> str:
        return self.messages[self.index][1]

    def next_message(self) -> dict[str, Any] | None:
        self.index += 1
        self.steps = 0
        if self.index >= len(self.messages):
            self.state = "done"
            return None
        return {"kind": "message", "chat_id": self.chat, "text": self.text}

    def decide(self) -> dict[str, Any] | None:
        """The next thing to do after reading what the bot said (None: this conversation is over)."""
        heard, self.heard = self.heard, []
        self.steps += 1
        if self.resend is not None:
            update, self.resend = self.resend, None
            return update
        if self.steps > 8 or not self.answers:
            return None
        buttons = [button for m in heard for button in buttons_of(m)]
        text = "\n".join(m.get("text", "") for m in heard)
        # a join offer (same event already reported by another citizen): file anyway, so every confirm is a ticket
        for prefix in ("d:ok:", "kb:yes:", "time:", "j:new:"):
            for data, mid in buttons:
                if data.startswith(prefix):
                    self.confirmed = self.text
                    if prefix == "d:ok:":  # what the summary under that button says is filed
                        shown = [m.get("text", "") for m in heard if (data, mid) in buttons_of(m)]
                        self.confirmed = (summary_content(shown[-1]) if shown else None) or self.text
                    return {"kind": "press", "chat_id": self.chat, "data": data, "message_id": mid or 1}
        if "实名" in text or "分享手机号" in text:
            return {
                "kind": "contact",
                "chat_id": self.chat,
                "phone": f"139{self.chat % 10**8:08d}",
                "name": "张",
            }
        if "事发地点" in text:
            if self.rng.random() < 0.5:
                return {
                    "kind": "location",
                    "chat_id": self.chat,
                    "lat": 31.05 + self.rng.random() / 100,
                    "lon": 107.08 + self.rng.random() / 100,
                }
            return {"kind": "message", "chat_id": self.chat, "text": self.rng.choice(PLACES)}
        return None


def buttons_of(message: dict[str, Any]) -> list[tuple[str, int | None]]:
    """A message's buttons as (callback data, the message's id)."""
    return [(b[1], message.get("message_id")) for b in message.get("buttons", [])]


def summary_content(summary: str) -> str | None:
    """The request's content as the confirmation summary shows it (its "内容：" field, up to the "地点：" line;
    the content may span lines), or None when the message is no summary."""
    start = summary.find("\n内容：")
    end = summary.find("\n地点：", start)
    if start < 0 or end < 0:
        return None
    return summary[start + len("\n内容：") : end]


def superseded_confirms(sent: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(chat, confirm button) of summaries superseded before their confirmation could file them: the bot said
    a later message was added to the request (a new summary with a new token), and the request was not filed
    in between. Read off the bot's messages in the order it sent them (a chat's steps run in order)."""
    filed = tuple(
        t.split("{")[0] for t in ("✅ 已受理", texts.REVIEW_QUEUED, texts.CANCELLED, texts.JOINED, texts.KB_SOLVED)
    )
    draft: dict[str, list[str]] = {}  # chat -> confirm buttons shown since its last request was filed
    out: set[tuple[str, str]] = set()
    for m in sent:
        chat, text = m["chat_id"], m.get("text", "")
        confirm = next((data for data, _ in buttons_of(m) if data.startswith("d:ok:")), None)
        if text.startswith(texts.TEXT_ADDED):
            out.update((chat, old) for old in draft.get(chat, []) if old != confirm)
            draft[chat] = [confirm] if confirm else []
        elif confirm:
            draft.setdefault(chat, []).append(confirm)
        elif text.startswith(filed):
            draft.pop(chat, None)
    return out


# --------------------------------------------------------------------------- talking to the fake server


class FakeServer:
    """The fake Bot API in its own process, driven over HTTP."""

    def __init__(self, port: int, log_path: Path, *, balance_webhooks: bool = False) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "ab")
        cmd = [sys.executable, "-m", "bot.fake_bot_api", "--port", str(port)]
        if balance_webhooks:  # several bots behind webhooks, updates posted to them in turn, 40 at a time
            # (Telegram's default max_connections for a webhook; 16 before, which let a database stall that
            # holds webhook answers also hold back updates, emergencies among them, inside the fake Telegram)
            cmd += ["--balance-webhooks", "--webhook-workers", "40"]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        _wait_until(lambda: self.stats(), 15, "the fake Bot API did not start")

    def call(self, what: str, payload: dict[str, Any] | None = None, timeout: float = 10) -> Any:
        data = json.dumps(payload or {}).encode()
        req = urllib.request.Request(
            f"{self.base_url}/control/{what}",
            data=data,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())["result"]

    def stats(self) -> dict[str, Any] | None:
        try:
            return self.call("stats", timeout=2)
        except OSError:
            return None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


WEBHOOK_SECRET = "bench-secret"


class BotProcess:
    """The bot (python-telegram-bot, long polling — or behind a webhook on ``webhook_port``) in its own
    process, killable."""

    def __init__(
        self, db_url: str, api_url: str, brain: str, log_path: Path, webhook_port: int | None = None
    ) -> None:
        self.cmd = [
            sys.executable,
            "-m",
            "bot.bench_e2e",
            "serve-bot",
            "--db",
            db_url,
            "--api",
            api_url,
            "--brain",
            brain,
        ]
        self.webhook = f"http://127.0.0.1:{webhook_port}/tg" if webhook_port else ""
        if webhook_port:
            self.cmd += ["--webhook", self.webhook, "--secret", WEBHOOK_SECRET, "--port", str(webhook_port)]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.starts: list[float] = []
        self.cpu_before = 0.0  # CPU seconds of processes already gone
        self.env: dict[str, str] = {}  # added to the environment (the shared triage server's address)

    def spawn(self, preload: bool = False) -> None:
        cmd = [*self.cmd, "--preload"] if preload else list(self.cmd)
        cmd += ["--sql-stats", str(self.log_path.parent / f"sql_stats_{self.log_path.stem}_{len(self.starts)}.json")]
        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
            )
        self.starts.append(time.time())

    def start(self, server: FakeServer, timeout: float = 180) -> float:
        """Start with the model loaded and wait until it polls; returns the seconds it took."""
        t0 = time.monotonic()
        calls_before = (server.stats() or {}).get("calls", {})
        before, webhooks_before = calls_before.get("getUpdates", 0), calls_before.get("setWebhook", 0)
        self.spawn(preload=True)

        def polling() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the bot exited with {self.proc.returncode}; see {self.log_path}")
            calls = (server.stats() or {}).get("calls", {})
            if self.webhook:  # its webhook is set (run_webhook listens before it calls setWebhook)
                return calls.get("setWebhook", 0) > webhooks_before
            return calls.get("getUpdates", 0) > before

        _wait_until(polling, timeout, "the bot did not start polling")
        return time.monotonic() - t0

    def cpu(self) -> float:
        return self.cpu_before + cpu_seconds(self.proc.pid if self.proc else None)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.cpu_before += cpu_seconds(self.proc.pid)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


class BotFleet:
    """One polling bot, or ``n`` >= 2 bots behind webhooks sharing the database (the multi-process deployment
    of the README); faults kill and restart the first."""

    def __init__(
        self, n: int, db_url: str, api_url: str, brain: str, workdir: Path, *, triage_server: bool = False
    ) -> None:
        if n <= 1:
            self.bots = [BotProcess(db_url, api_url, brain, workdir / "bot.log")]
        else:
            self.bots = [
                BotProcess(db_url, api_url, brain, workdir / f"bot{i}.log", webhook_port=_free_port())
                for i in range(n)
            ]
        self.triage: subprocess.Popen | None = None
        self.triage_cmd: list[str] | None = None
        self.workdir = workdir
        if triage_server and brain == "real":  # one model for all bots (bot/triage_server.py)
            address = str(workdir / "triage.sock")
            self.triage_cmd = [sys.executable, "-m", "bot.triage_server", "--listen", address, "--db", db_url]
            for bot in self.bots:
                bot.env = {"HOTLINE_TRIAGE_SERVER": address, "HOTLINE_TRIAGE_KEY": TRIAGE_KEY}

    def start(self, server: FakeServer, timeout: float = 180) -> float:
        t0 = time.monotonic()
        if self.triage_cmd is not None:
            with open(self.workdir / "triage.log", "ab") as fh:
                self.triage = subprocess.Popen(
                    self.triage_cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                    env={**os.environ, "HOTLINE_TRIAGE_KEY": TRIAGE_KEY},
                )
        for bot in self.bots:  # one after another: each loads the model (two at once thrash two cores)
            bot.start(server, timeout)
        return time.monotonic() - t0

    def spawn(self) -> None:
        self.bots[0].spawn()

    def kill(self) -> None:
        self.bots[0].kill()

    def cpu(self) -> float:
        return sum(b.cpu() for b in self.bots) + cpu_seconds(self.triage.pid if self.triage else None)

    def stop(self) -> None:
        for bot in self.bots:
            bot.stop()
        if self.triage is not None and self.triage.poll() is None:
            self.triage.terminate()
            try:
                self.triage.wait(10)
            except subprocess.TimeoutExpired:
                self.triage.kill()


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) a live process and its live children (the bot's triage process) have used
    so far (Linux /proc; 0 when unknown)."""
    return own_cpu_seconds(pid) + sum(cpu_seconds(child) for child in _children(pid))


def own_cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) of one live process, without its children (0 when unknown)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0


def postgres_cpu_seconds() -> float:
    """CPU time of this machine's PostgreSQL so far: its processes alive now, and the backends that have ended
    (the server process counts its reaped children's time; without it, a connection closed between two
    readings would take its CPU time with it). 0 when the database runs elsewhere."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, _, rest = stat.read_text().rpartition(")")
        except OSError:
            continue
        if head.endswith("(postgres"):
            fields = rest.split()  # utime, stime, cutime, cstime
            total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def cpu_by_process(bot: BotFleet, server: FakeServer) -> dict[str, float]:
    """CPU seconds so far of each part of the bench: the bot processes' own Python, the triage model (the bots'
    triage processes or the shared triage server), PostgreSQL, the fake Telegram and this driver."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    live = [b.proc.pid for b in bot.bots if b.proc is not None and b.proc.poll() is None]
    return {
        "bot": sum(own_cpu_seconds(pid) for pid in live),
        "triage": sum(cpu_seconds(child) for pid in live for child in _children(pid))
        + cpu_seconds(bot.triage.pid if bot.triage else None),
        "postgres": postgres_cpu_seconds(),
        "fake_api": cpu_seconds(server.proc.pid),
        "driver": usage.ru_utime + usage.ru_stime,
    }


def python_loop_ms(n: int = 2_000_000, repeat: int = 3) -> float:
    """CPU milliseconds a fixed pure-Python loop takes (best of ``repeat``): this machine's speed at the time.
    On a shared virtual machine it varied by 1.8x between runs minutes apart on an idle guest, and the
    bench's latencies with it; the report gives it from before and after the load so that runs can be
    compared."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        total = 0
        for i in range(n):
            total += i
        best = min(best, time.process_time() - started)
    return round(best * 1000, 1)


def _children(pid: int | None) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except (OSError, ValueError):
            pass
    return out


def _wait_until(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the database


@dataclass
class Database:
    url: str  # what the bot and the driver use
    kind: str  # postgresql | sqlite
    cleanup: Any = None
    admin_url: str | None = None


def _with_query(url: str, **params: str) -> str:
    from urllib.parse import urlencode

    return url + ("&" if "?" in url else "?") + urlencode(params)


def prepare_database(url: str | None, workdir: Path) -> Database:
    """A throwaway schema in the given PostgreSQL database, or a temporary SQLite file; migrated, with the
    unit catalog, the seed knowledge base, and a group chat bound to every unit and to the center."""
    from sqlalchemy import create_engine, text

    if url and url.startswith("postgresql"):
        schema = f"bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(url)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))

        def drop() -> None:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            admin.dispose()

        db = Database(_with_query(url, options=f"-csearch_path={schema}"), "postgresql", drop, url)
    else:
        db = Database(f"sqlite:///{workdir / 'bench.db'}", "sqlite")
    _initialise(db.url)
    return db


def _initialise(url: str) -> None:
    from models.base import Base
    from models.bootstrap import open_database
    from models.catalog import CENTER
    from models.tables import ChatBinding, Unit

    engine, factory = open_database(url)
    Base.metadata.create_all(engine)  # tables newer than the migrations (inbound_updates until regenerated)
    with factory.begin() as s:
        for i, code in enumerate(sorted(u.code for u in s.query(Unit).all())):
            s.merge(ChatBinding(chat_id=-1_000_000 - i, unit_code=code))
        if s.get(ChatBinding, -1_999_999) is None and s.get(Unit, CENTER) is not None:
            s.merge(ChatBinding(chat_id=-1_999_999, unit_code=CENTER))
    engine.dispose()


def terminate_bot_connections(admin_url: str) -> int:
    """Drop every PostgreSQL connection the bot holds (as a database restart or a network cut would)."""
    from sqlalchemy import create_engine

    engine = create_engine(admin_url)
    try:
        with engine.begin() as conn:
            return _terminate(conn)
    finally:
        engine.dispose()


def _terminate(conn) -> int:
    from sqlalchemy import text

    return len(
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = :name AND pid <> pg_backend_pid()"
            ),
            {"name": BOT_APP_NAME},
        ).all()
    )


def database_outage(admin_url: str, seconds: float, ev: dict[str, Any]) -> threading.Thread:
    """For ``seconds``, terminate every connection of the bot as soon as it appears (every 50 ms): a database
    that is restarting, as the bot sees it. Runs in a thread; writes what it did into ``ev``."""
    from sqlalchemy import create_engine

    def cut() -> None:
        engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        n = 0
        try:
            with engine.connect() as conn:
                stop = time.time() + seconds
                while time.time() < stop:
                    n += _terminate(conn)
                    time.sleep(0.05)
        finally:
            engine.dispose()
            ev["detail"] = (
                f"every connection of the bot terminated as soon as it appeared, for {seconds:.0f} s ({n} in all)"
            )

    thread = threading.Thread(target=cut, name="db-outage", daemon=True)
    thread.start()
    return thread


# --------------------------------------------------------------------------- the run


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return round(values[k] * 1000, 1)


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": _pct(values, 50),
        "p95_ms": _pct(values, 95),
        "p99_ms": _pct(values, 99),
        "max_ms": round(max(values) * 1000, 1) if values else None,
    }


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _brain_available() -> bool:
    try:
        import triage.pipeline  # noqa: F401
    except ImportError:
        return False
    return True


def bench_e2e(
    citizens: int = 500,
    url: str | None = None,
    *,
    messages_per_citizen: int = 2,
    duration_cap_s: float = 120,
    faults: bool = True,
    arrival_rate: float = 12.5,
    brain: str = "auto",
    seed: int = 12345,
    bots: int = 1,
    triage_server: bool | None = None,
    mix: str = "conversations",
) -> dict:
    """Run the benchmark; returns the measurements and the checks (see the module docstring).
    ``duration_cap_s`` bounds the load and the drain once the bot is up (setup, mostly loading the triage
    model, comes before it).

    ``arrival_rate`` citizens start per second (each sends ~5 updates over ~15 s, so 12.5/s offers ~60
    updates/s once all are under way); ``brain`` is "real" (triage.pipeline + knowledge base), "stand-in"
    (screening rules and keywords; no model) or "auto" (the real one when it is installed). ``bots``: 1 bot
    long-polling, or that many bots behind webhooks that the fake Telegram feeds in turn (faults kill one).
    ``triage_server``: the bots share one ``triage-serve`` process (default: with 2 or more bots); otherwise
    each runs the model in a child process of its own (bot/triage_process.py). The bots' CPU includes it.
    ``mix``: "conversations" (citizens answer the bot and confirm) or "flood" (text messages only; see the
    module docstring).
    """
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {', '.join(MIXES)}")
    if brain == "auto":
        brain = "real" if _brain_available() else "stand-in"
    if threading.current_thread() is threading.main_thread():  # `kill` still drops the schema
        signal.signal(signal.SIGTERM, _interrupt)
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="hotline-bench-"))
    t_setup = time.monotonic()
    db = prepare_database(url, workdir)
    bot_url = _with_query(db.url, application_name=BOT_APP_NAME) if db.kind == "postgresql" else db.url
    server = FakeServer(_free_port(), workdir / "fake_api.log", balance_webhooks=bots > 1)
    if triage_server is None:
        triage_server = bots > 1
    bot = BotFleet(bots, bot_url, server.base_url, brain, workdir, triage_server=triage_server)
    try:
        first_start = bot.start(server)
        setup_s = time.monotonic() - t_setup
        speed_before = python_loop_ms()
        result = _drive(
            server,
            bot,
            db,
            rng,
            citizens=citizens,
            per_citizen=messages_per_citizen,
            cap=duration_cap_s,
            faults=faults,
            arrival_rate=arrival_rate,
            workdir=workdir,
            answers=mix == "conversations",
        )
        result["setup"] = {
            "database": db.kind,
            "brain": brain,
            "bot_start_s": round(first_start, 1),
            "setup_s": round(setup_s, 1),
            "logs": str(workdir),
            "citizens": citizens,
            "messages_per_citizen": messages_per_citizen,
            "mix": mix,
            "arrival_rate_per_s": arrival_rate,
            "faults": faults,
            "bots": bots,
            "triage": "shared server" if bot.triage_cmd else ("own process" if brain == "real" else "stand-in"),
            "python_loop_ms_before_after": [speed_before, python_loop_ms()],
        }
        return result
    finally:
        bot.stop()
        server.stop()
        if db.cleanup is not None:
            db.cleanup()


def _drive(
    server: FakeServer,
    bot: BotFleet,
    db: Database,
    rng: random.Random,
    *,
    citizens: int,
    per_citizen: int,
    cap: float,
    faults: bool,
    arrival_rate: float,
    workdir: Path | None = None,
    answers: bool = True,
) -> dict:
    t0 = time.time()
    arrival = citizens / arrival_rate
    people = {
        5_000_000 + i: Citizen(
            5_000_000 + i,
            make_messages(rng, per_citizen),
            t0 + i / arrival_rate + rng.random() / 10,
            random.Random(rng.random()),
            answers=answers,
        )
        for i in range(citizens)
    }
    # the clean stretch measured for throughput and latency, then the faults one after another
    clean = (t0 + 0.25 * arrival, t0 + 0.70 * arrival)
    plan: list[tuple[float, str]] = []
    if faults:
        # seconds after the clean stretch ends; spaced so that each fault's effect can be told apart
        plan = [
            (1, "telegram_500"),
            (4, "telegram_429"),
            (7, "telegram_slow"),
            (11, "db_drop"),
            (14, "db_outage"),
            (20, "bot_kill"),
        ]
    plan_at = [(clean[1] + dt, name) for dt, name in plan]
    events: list[dict[str, Any]] = []
    sent_next = 0
    all_sent: list[dict[str, Any]] = []
    pushed: list[dict[str, Any]] = []  # every citizen update: chat, id, at, what, emergency
    # chat, content confirmed, the latest text written, the button pressed
    expected_tickets: list[tuple[int, str, str, str]] = []
    flood_refusals = 0
    deadline = t0 + cap
    restart_pending: float | None = None

    # SQL statements, Telegram calls and CPU seconds by process at the clean stretch's ends
    snaps: list[tuple[Counter, dict, dict[str, float]]] = []

    while time.time() < deadline:
        now = time.time()
        if workdir is not None and len(snaps) < 2 and now >= clean[len(snaps)]:
            snaps.append(
                (read_sql_stats(workdir), dict((server.stats() or {}).get("calls", {})), cpu_by_process(bot, server))
            )
        # 1. what the bot said
        got = server.call("sent", {"after": sent_next})
        sent_next = got["next"]
        for s in got["sent"]:
            all_sent.append(s)
            c = people.get(_int(s["chat_id"]))
            if c is not None and s["text"] not in (FOLLOW_UP, QUEUED):  # a citizen told to wait, waits
                c.heard.append(s)
        # 2. the faults
        while plan_at and now >= plan_at[0][0]:
            _, name = plan_at.pop(0)
            events.append(_inject(name, server, bot, db))
            if name == "bot_kill":
                restart_pending = time.time() + 1.0
        if restart_pending is not None and now >= restart_pending:
            restart_pending = None
            bot.spawn()  # not waited for: citizens keep writing while it starts and loads the model
            events.append({"fault": "bot_restarted", "at": time.time()})
        # 3. the citizens
        batch: list[tuple[Citizen, dict[str, Any], str, bool]] = []
        for c in people.values():
            if c.state == "done":
                continue
            if c.state == "new" and now >= c.start:
                update = c.next_message()
                batch.append((c, update, "message", c.messages[c.index][0] == "emergency"))
            elif c.state == "waiting":
                w = c.waiting
                if any(m["at"] >= w.at for m in c.heard):
                    if any("发送得太快" in m["text"] for m in c.heard):
                        flood_refusals += 1
                        c.resend = c.last_update
                        c.act_at = now + 10.5
                    else:
                        c.act_at = now + c.rng.uniform(1.5, 3.0)
                    c.state = "thinking"
                elif now - w.local > REPLY_TIMEOUT:
                    c.state = "done"  # gives up; checked again at the end
            elif c.state == "thinking" and now >= c.act_at:
                update = c.decide()
                what = "press" if update and update["kind"] == "press" else None
                if update is None:
                    c.act_at = now + c.rng.uniform(2.0, 4.0)
                    c.state = "between"
                    continue
                if what and update["data"].startswith(("d:ok:", "kb:yes:")):
                    expected_tickets.append((c.chat, c.confirmed or c.text, c.text, update["data"]))
                batch.append((c, update, update["kind"], False))
            elif c.state == "between" and now >= c.act_at:
                update = c.next_message()
                if update is not None:
                    batch.append((c, update, "message", c.messages[c.index][0] == "emergency"))
        if batch:
            ids = server.call("updates", {"updates": [u for _, u, _, _ in batch]})["updates"]
            for (c, update, what, emergency), info in zip(batch, ids, strict=True):
                c.waiting = Waiting(info["update_id"], info["at"], what, emergency, time.time())
                c.last_update = update
                c.heard = [m for m in c.heard if m["at"] >= info["at"]]
                c.state = "waiting"
                pushed.append(
                    {
                        "chat": c.chat,
                        "id": info["update_id"],
                        "at": info["at"],
                        "what": what,
                        "emergency": emergency,
                    }
                )
        if not plan_at and restart_pending is None and all(c.state == "done" for c in people.values()):
            break
        time.sleep(0.05)
    load_end = time.time()
    import resource

    cpu = {
        "bot": round(bot.cpu(), 1),
        "fake_api": round(cpu_seconds(server.proc.pid), 1),
        "driver": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_utime
            + resource.getrusage(resource.RUSAGE_SELF).ru_stime,
            1,
        ),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    drained = _drain(db, deadline)
    got = server.call("sent", {"after": sent_next})
    all_sent.extend(got["sent"])
    result = _report(
        t0,
        load_end,
        drained,
        clean,
        pushed,
        all_sent,
        expected_tickets,
        events,
        db,
        flood_refusals,
        server.stats(),
        citizens,
        workdir,
    )
    result["cpu_s_during_load"] = cpu
    result["first_reply_stages_clean"] = step_stages(workdir, clean)
    if len(snaps) == 2:  # per citizen update sent in the clean stretch (the bot's own work included)
        n = max(1, sum(1 for p in pushed if clean[0] <= p["at"] < clean[1]))
        sql = snaps[1][0] - snaps[0][0]
        calls = Counter(snaps[1][1]) - Counter(snaps[0][1])
        result["per_update_clean"] = {
            "updates": n,
            "sql_statements": round(sql["total"] / n, 2),
            "sql_by_kind": {k: round(v / n, 2) for k, v in sorted(sql.items()) if k != "total"},
            "telegram_calls": {k: round(v / n, 2) for k, v in sorted(calls.items())},
            # machine-comparable: what one update costs each part; over the stretch's length, the cores in use
            "cpu_ms": {k: round(1000 * (snaps[1][2][k] - v) / n, 2) for k, v in snaps[0][2].items()},
            "cores_in_use": round(
                (sum(snaps[1][2].values()) - sum(snaps[0][2].values())) / max(1e-9, clean[1] - clean[0]), 2
            ),
        }
    return result


def _rate(updates: list[dict[str, Any]], span: float) -> float | None:
    return round(len(updates) / span, 1) if span > 0 else None


def _int(chat: str) -> int:
    try:
        return int(chat)
    except ValueError:
        return 0


def _inject(name: str, server: FakeServer, bot: BotFleet, db: Database) -> dict[str, Any]:
    ev: dict[str, Any] = {"fault": name, "at": time.time()}
    if name == "telegram_500":
        server.call("fail", {"status": 500, "count": 40})
        ev["detail"] = "the next 40 sends answer 500"
    elif name == "telegram_429":
        server.call("fail", {"status": 429, "count": 15, "retry_after": 2})
        ev["detail"] = "the next 15 sends answer 429 retry_after=2"
    elif name == "telegram_slow":
        server.call("fail", {"status": 200, "count": 40, "delay": 1.5})
        server.call("fail", {"status": 504, "count": 10, "delay": 2.0})
        ev["detail"] = "40 sends answered after 1.5 s, then 10 sends time out with 504 after 2 s"
    elif name == "db_drop":
        if db.kind != "postgresql":
            ev["detail"] = "skipped: SQLite has no connections to drop"
        else:
            n = terminate_bot_connections(db.admin_url)
            time.sleep(1.5)
            n += terminate_bot_connections(db.admin_url)
            ev["detail"] = f"pg_terminate_backend on {n} connections of the bot (twice, 1.5 s apart)"
    elif name == "db_outage":
        if db.kind != "postgresql":
            ev["detail"] = "skipped: SQLite has no connections to drop"
        else:
            ev["detail"] = f"database outage of {DB_OUTAGE_S:.0f} s started"
            database_outage(db.admin_url, DB_OUTAGE_S, ev)
    elif name == "bot_kill":
        bot.kill()
        ev["detail"] = "SIGKILL to the bot process; restarted 1 s later"
    log.info("fault injected: %s", ev)
    return ev


def _db_counts(db: Database) -> dict[str, Any]:
    from sqlalchemy import create_engine, func, select

    from models.tables import InboundUpdate, OutboxMessage

    engine = create_engine(db.url)
    try:
        with engine.connect() as conn:
            outbox = dict(
                conn.execute(select(OutboxMessage.status, func.count()).group_by(OutboxMessage.status)).all()
            )
            inbox = conn.execute(
                select(func.count()).select_from(InboundUpdate).where(InboundUpdate.done_at.is_(None))
            ).scalar_one()
        return {"outbox": outbox, "inbox_pending": inbox}
    finally:
        engine.dispose()


def _drain(db: Database, deadline: float) -> dict[str, Any]:
    """Wait for the outbox and the inbox to empty (replies held by a killed bot go out when their claim ends)."""
    t = time.time()
    counts = _db_counts(db)
    while time.time() < deadline:
        counts = _db_counts(db)
        if (
            not counts["outbox"].get("pending")
            and not counts["outbox"].get("sending")
            and not counts["outbox"].get("claimed")
            and not counts["inbox_pending"]
        ):
            break
        time.sleep(0.5)
    return {**counts, "drain_s": round(time.time() - t, 1)}


def _report(
    t0: float,
    load_end: float,
    drained: dict[str, Any],
    clean: tuple[float, float],
    pushed: list[dict[str, Any]],
    sent: list[dict[str, Any]],
    expected: list[tuple[int, str, str, str]],
    events: list[dict[str, Any]],
    db: Database,
    flood_refusals: int,
    stats: dict | None,
    citizens: int,
    workdir: Path | None = None,
) -> dict:
    from sqlalchemy import create_engine, func, select

    from models.tables import Citizen as CitizenRow
    from models.tables import OutboxMessage, Ticket

    # first replies: any message; answers: not the "please wait" notice of a peak
    by_chat: dict[str, list[float]] = {}
    answers_by_chat: dict[str, list[float]] = {}
    for s in sent:
        if s["text"] != FOLLOW_UP:
            by_chat.setdefault(s["chat_id"], []).append(s["at"])
            if s["text"] != QUEUED:
                answers_by_chat.setdefault(s["chat_id"], []).append(s["at"])
    for v in (*by_chat.values(), *answers_by_chat.values()):
        v.sort()
    import bisect

    engine = create_engine(db.url)
    with engine.connect() as conn:
        queued_chats = set(
            conn.execute(
                select(OutboxMessage.chat_id).where(
                    OutboxMessage.status.in_(("pending", "claimed", "sending"))
                )
            ).scalars()
        )
        rows = conn.execute(
            select(
                OutboxMessage.id,
                OutboxMessage.chat_id,
                OutboxMessage.text,
                OutboxMessage.status,
                OutboxMessage.kind,
                OutboxMessage.attempts,
                OutboxMessage.created_at,
                OutboxMessage.sent_at,
                OutboxMessage.last_error,
            )
        ).all()
        tickets = conn.execute(
            select(CitizenRow.external_id, Ticket.original_text, func.count())
            .join(CitizenRow, CitizenRow.id == Ticket.citizen_id)
            .group_by(CitizenRow.external_id, Ticket.original_text)
        ).all()
        n_tickets = conn.execute(select(func.count()).select_from(Ticket)).scalar_one()
    engine.dispose()

    lat_all, lat_clean, lat_em_clean, lat_em_all, lat_fault = [], [], [], [], []
    answer_all, answer_clean = [], []
    lost, queued, late = [], 0, 0
    faults_from = min((e["at"] for e in events), default=float("inf"))
    # emergencies sent while each fault was the latest one injected (until the next; the last until the end):
    # when Telegram itself is slow or the only bot is dead, no answer can be fast, and this shows which it was
    phases = sorted((e["at"], e["fault"]) for e in events if e["fault"] != "bot_restarted")
    lat_em_phase: dict[str, list[float]] = {}
    for p in pushed:
        answers = answers_by_chat.get(str(p["chat"]), [])
        j = bisect.bisect_left(answers, p["at"])
        if j == len(answers):  # nothing but "please wait" (or nothing at all) came after it
            if str(p["chat"]) in queued_chats:
                queued += 1
            else:
                lost.append(p)
            continue
        answer_all.append(answers[j] - p["at"])
        if clean[0] <= p["at"] < clean[1]:
            answer_clean.append(answers[j] - p["at"])
        times = by_chat[str(p["chat"])]
        latency = times[bisect.bisect_left(times, p["at"])] - p["at"]  # the first reply: an answer or a notice
        late += answers[j] - p["at"] > REPLY_TIMEOUT
        lat_all.append(latency)
        if p["emergency"]:
            lat_em_all.append(latency)
            started = [name for at, name in phases if at <= p["at"]]
            if started:
                lat_em_phase.setdefault(started[-1], []).append(latency)
        if clean[0] <= p["at"] < clean[1]:
            lat_clean.append(latency)
            if p["emergency"]:
                lat_em_clean.append(latency)
        elif p["at"] >= faults_from:
            lat_fault.append(latency)
    in_clean = [p for p in pushed if clean[0] <= p["at"] < clean[1]]
    timeline: dict[int, list[float]] = {}  # 5-second buckets: updates sent, first-reply p50/p95
    for p in pushed:
        times = by_chat.get(str(p["chat"]), [])
        k = bisect.bisect_left(times, p["at"])
        if k < len(times):
            timeline.setdefault(int((p["at"] - t0) // 5) * 5, []).append(times[k] - p["at"])
    span = clean[1] - clean[0]

    # tickets: one per confirmation
    superseded = superseded_confirms(sent)
    expected = [e for e in expected if (str(e[0]), e[3]) not in superseded]
    made: Counter[tuple[int, str]] = Counter()
    for ext, text, n in tickets:
        if ext.isdigit():
            made[(int(ext), text[:300])] += n  # as far as a summary shows it
    want = Counter((chat, content) for chat, content, _, _ in expected)
    not_last = sum(1 for _, content, latest, _ in expected if content != latest)
    duplicated_tickets = sum(max(0, made[k] - 1) for k in made)
    missing_tickets = sum(1 for k in want if made[k] == 0)
    if workdir is not None and missing_tickets:  # what each such citizen sent and heard, to find out why
        chats_updates: dict[int, list[dict[str, Any]]] = {}
        for p in pushed:
            chats_updates.setdefault(p["chat"], []).append(p)
        with open(workdir / "missing_tickets.jsonl", "w") as fh:
            for chat, text in (k for k in want if made[k] == 0):
                heard = [(round(x["at"] - t0, 2), x["text"][:200]) for x in sent if x["chat_id"] == str(chat)]
                did = [(round(p["at"] - t0, 2), p["id"], p["what"]) for p in chats_updates.get(chat, [])]
                line = {"chat": chat, "text": text[:60], "updates": did, "heard": heard}
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")

    # outbox: each row delivered once (compared by chat and text with what the fake server received)
    direct_only = {FOLLOW_UP, texts.FLOOD, texts.BUSY, QUEUED}  # sent without an outbox row when all goes well
    sends = Counter((s["chat_id"], s["text"]) for s in sent if s["text"] not in direct_only)
    rows_sent = Counter((r.chat_id, r.text) for r in rows if r.status == "sent" and r.text not in direct_only)
    rows_all = Counter((r.chat_id, r.text) for r in rows if r.text not in direct_only)
    # a row still "sending" when the run ends (the bot stopped between Telegram's answer and recording it) may
    # have been delivered once: only sends beyond the rows that were sent or in flight are double
    rows_out = Counter(
        (r.chat_id, r.text) for r in rows if r.status in ("sent", "sending") and r.text not in direct_only
    )
    dup_keys = [k for k in rows_all if sends[k] > rows_out[k]]
    dup_outbox = sum(sends[k] - rows_out[k] for k in dup_keys)
    if workdir is not None:  # for a post-mortem: what was sent twice, when, and its rows
        with open(workdir / "delivered_twice.jsonl", "w") as fh:
            for k in dup_keys:
                fh.write(
                    json.dumps(
                        {
                            "chat": k[0],
                            "text": k[1][:60],
                            "sends": [
                                (round(x["at"] - t0, 2), x["method"])
                                for x in sent
                                if (x["chat_id"], x["text"]) == k
                            ],
                            "rows": [r._asdict() for r in rows if (r.chat_id, r.text) == k],
                        },
                        ensure_ascii=False,
                        default=str,
                    )
                    + "\n"
                )
    not_delivered = sum(max(0, rows_sent[k] - sends[k]) for k in rows_sent)
    failed_rows = sum(1 for r in rows if r.status == "failed")
    # double sends, told apart (issue 8): a message Telegram had received when the bot was SIGKILLed, before
    # the bot could record it as sent, is sent again after the restart (Telegram has no idempotency key):
    # "at_kill" are those whose first copy arrived within KILL_WINDOW_S before the kill (or while it landed);
    # "flagged" those the outbox itself marked as resent after an unconfirmed send; "other" anything else.
    from bot.outbox import UNCONFIRMED

    kills = [e["at"] for e in events if e["fault"] == "bot_kill"]
    dup_at_kill = dup_other = 0
    for k in dup_keys:
        first = min(x["at"] for x in sent if (x["chat_id"], x["text"]) == k)
        extra = sends[k] - rows_out[k]
        if any(kill - KILL_WINDOW_S <= first <= kill + 0.5 for kill in kills):
            dup_at_kill += extra
        else:
            dup_other += extra
    flagged = sum(1 for r in rows if r.status == "sent" and r.attempts > 1)
    flagged_unconfirmed = sum(1 for r in rows if (r.last_error or "").startswith(UNCONFIRMED))

    for e in events:
        e["t"] = round(e.pop("at") - t0, 1)
    return {
        "throughput": {
            "clean_window_s": round(span, 1),
            # every update a citizen sends waits for an answer: text and other messages, and button presses
            "citizen_updates_per_s": _rate(in_clean, span),
            "text_messages_per_s": _rate([p for p in in_clean if p["what"] == "message"], span),
            "contact_and_location_messages_per_s": _rate(
                [p for p in in_clean if p["what"] in ("contact", "location")], span
            ),
            "button_presses_per_s": _rate([p for p in in_clean if p["what"] == "press"], span),
            "updates_total": len(pushed),
            "load_s": round(load_end - t0, 1),
        },
        "first_reply_clean": _summary(lat_clean),
        "emergency_reply_clean": _summary(lat_em_clean),
        "emergency_reply_whole_run": _summary(lat_em_all),
        "emergency_reply_after_each_fault": {
            name: _summary(lat_em_phase[name]) for _, name in phases if name in lat_em_phase
        },
        "first_reply_during_faults": _summary(lat_fault),
        "first_reply_whole_run": _summary(lat_all),
        # the first message that is not the "received, please wait" notice sent at once in a peak
        "first_answer_clean": _summary(answer_clean),
        "first_answer_whole_run": _summary(answer_all),
        "queue_notices": sum(1 for s in sent if s["text"] == QUEUED),
        "timeline_5s": {t: [len(v), _pct(v, 50), _pct(v, 95)] for t, v in sorted(timeline.items())},
        "tickets": {
            "created": n_tickets,
            "confirmations": len(expected),
            "duplicated": duplicated_tickets,
            "missing": missing_tickets,
            "confirmed_content_not_last_message": not_last,
        },
        "updates": {
            "answered": len(lat_all),
            "answered_after_20s": late,
            "still_queued": queued,
            "lost": len(lost),
            "lost_examples": lost[:5],
            "flood_refusals": flood_refusals,
        },
        "guarantees": {
            "updates_lost": len(lost),
            "tickets_duplicated": duplicated_tickets,
            "tickets_missing": missing_tickets,
            "messages_lost": not_delivered + failed_rows,
            "double_sends": dup_outbox,
            "double_sends_in_flight_at_kill": dup_at_kill,
            "double_sends_other": dup_other,
            "rows_resent_after_unconfirmed_send": flagged_unconfirmed,
        },
        "outbox": {
            "rows": len(rows),
            "rows_sent_after_retry": flagged,
            "delivered_twice": dup_outbox,
            "recorded_sent_not_received": not_delivered,
            "failed_for_good": failed_rows,
            "by_kind": dict(Counter(r.kind for r in rows)),
        },
        "drain": drained,
        "faults": events,
        "fake_server": {k: v for k, v in (stats or {}).items() if k in ("updates_fed", "sent", "calls")},
    }


# --------------------------------------------------------------------------- the bot process


def stand_in_triage(policy_name: str):
    """Triage without the model: the real screening rules, then a keyword router (for runs where the
    model is not installed; the report says which brain ran)."""
    from models.policy import load_policy
    from triage.screening import screen

    policy = load_policy(policy_name)
    routes = [
        ("路灯", "chengguan", "help"),
        ("噪音", "shengtai", "complaint"),
        ("施工", "zhujian", "complaint"),
        ("烧烤", "chengguan", "complaint"),
        ("垃圾", "chengguan", "complaint"),
        ("停水", "gongshui", "help"),
        ("井盖", "chengguan", "help"),
        ("工资", "renshe", "complaint"),
        ("电梯", "shichang", "complaint"),
        ("过期", "shichang", "complaint"),
        ("污水", "shengtai", "report"),
        ("红绿灯", "gongan", "help"),
        ("遛狗", "gongan", "complaint"),
        ("装修", "zhujian", "complaint"),
        ("公交", "jiaotong", "suggestion"),
        ("居住证", "gongan", "consultation"),
        ("公积金", "gongjijin", "consultation"),
        ("社保", "renshe", "consultation"),
        ("医保", "yibao", "consultation"),
        ("营业执照", "shenpi", "consultation"),
    ]

    def triage(text: str) -> dict[str, Any]:
        r = screen(text, policy)
        if r.verdict == "emergency" and r.emergency is not None:
            return {
                "verdict": "emergency",
                "redirect": r.emergency.line,
                "label": r.emergency.label_zh,
                "type": "help",
                "units": [],
                "confidence": 1.0,
            }
        if r.verdict == "reject" and r.exclusion is not None:
            return {"verdict": "reject", "reason": r.exclusion.reason, "key": r.exclusion.key, "units": []}
        for word, unit, kind in routes:
            if word in text:
                return {
                    "verdict": "accept",
                    "type": kind,
                    "units": [unit],
                    "confidence": 0.9,
                    "urgent_level": r.urgent_level,
                }
        return {"verdict": "accept", "type": "help", "units": [], "confidence": 0.3, "needs_review": True}

    return triage


def _count_statements(engine, path: Path) -> None:
    """issue 8: count the SQL statements (and commits) the bot sends, by first word, and write the totals
    to ``path`` (one JSON file per bot process) every half second, for the driver's "statements per update"."""
    from sqlalchemy import event

    counts: Counter = Counter()
    lock = threading.Lock()

    @event.listens_for(engine, "before_cursor_execute")
    def _statement(_conn, _cursor, statement, _params, _context, executemany) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "?"
        with lock:
            counts[verb] += 1
            counts["total"] += 1

    @event.listens_for(engine, "commit")
    def _commit(_conn) -> None:
        with lock:
            counts["COMMIT"] += 1

    from bot import telegram_app

    stages: list = []
    telegram_app.STEP_STAGES = stages
    stages_path = path.with_name(path.name.replace("sql_stats", "step_stages", 1)).with_suffix(".jsonl")

    def dump() -> None:
        written = 0
        while True:
            time.sleep(0.5)
            with lock:
                data = dict(counts)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(path)
            new = stages[written:]
            written += len(new)
            if new:  # appended as they come: a killed bot keeps what it wrote
                with stages_path.open("a") as fh:
                    fh.writelines(json.dumps(row) + "\n" for row in new)

    threading.Thread(target=dump, daemon=True, name="sql-stats").start()


STAGES = ("chat_lock_and_triage", "worker_wait", "step", "send")


def step_stages(workdir: Path, window: tuple[float, float]) -> dict[str, Any]:
    """Where the first replies to citizen updates arriving in ``window`` (wall-clock seconds) spent their time,
    from what every bot process of the run recorded (``telegram_app.STEP_STAGES``): ``_summary`` and the mean."""
    rows = []
    for f in workdir.glob("step_stages_*.jsonl"):
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short when its bot was killed
                continue
            if window[0] <= row[0] < window[1]:
                rows.append(row[1:])
    out: dict[str, Any] = {"n": len(rows)}
    for i, name in enumerate(STAGES):
        seconds = [r[i] for r in rows]
        mean = round(sum(seconds) / len(seconds) * 1000, 1) if seconds else None
        out[name] = {**_summary(seconds), "mean_ms": mean}
    return out


def read_sql_stats(workdir: Path) -> Counter:
    """The statement counts of every bot process of the run so far (see ``_count_statements``)."""
    total: Counter = Counter()
    for f in workdir.glob("sql_stats_*.json"):
        try:
            total.update(json.loads(f.read_text()))
        except (OSError, ValueError):
            pass
    return total


def serve_bot(
    db_url: str,
    api_url: str,
    brain: str,
    *,
    webhook: str = "",
    secret: str = "",
    port: int = 0,
    preload: bool = False,
    sql_stats: str = "",
) -> None:
    """The bot process of the benchmark: ``python -m bot.bench_e2e serve-bot --db URL --api URL``; with
    ``--webhook URL --secret S --port P`` it serves a webhook instead of polling (tests/test_multiprocess.py),
    as ``hotline run --webhook`` does."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
    )
    from bot.services import Services, build_services
    from bot.telegram_app import build_application
    from models.db import make_engine, make_session_factory
    from models.settings import get_settings

    if os.environ.get("HOTLINE_SWITCH_INTERVAL"):  # experiments: the GIL's hand-over interval (seconds)
        sys.setswitchinterval(float(os.environ["HOTLINE_SWITCH_INTERVAL"]))
    engine = make_engine(db_url, pre_ping=False)  # as `hotline run` with a token (models/db.py)
    if sql_stats:
        _count_statements(engine, Path(sql_stats))
    factory = make_session_factory(engine)
    if brain == "real":
        services = build_services(factory)
    else:
        policy = get_settings().policy
        services = Services(sessions=factory, triage=stand_in_triage(policy), policy_name=policy)
    app, hb = build_application(services, TOKEN, base_url=api_url, outbox_interval=0.5)
    if preload and brain == "real":  # the first start: measured with the model loaded (a restart loads it
        hb.services.triage.load()  # while answering); in the triage process unless HOTLINE_TRIAGE_PROCESS=0
    if webhook:
        from urllib.parse import urlparse

        print(f"bot {os.getpid()} serving webhook {webhook}", flush=True)
        app.run_webhook(
            listen="127.0.0.1",
            port=port,
            url_path=urlparse(webhook).path.lstrip("/"),
            webhook_url=webhook,
            secret_token=secret,
        )
        return
    print(f"bot {os.getpid()} polling {api_url}", flush=True)
    app.run_polling(poll_interval=0.0, timeout=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot.bench_e2e")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve-bot")
    p.add_argument("--db", required=True)
    p.add_argument("--api", required=True)
    p.add_argument("--brain", default="real", choices=["real", "stand-in"])
    p.add_argument("--webhook", default="")
    p.add_argument("--secret", default="")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--preload", action="store_true", help="load the triage model before polling")
    p.add_argument("--sql-stats", default="", help="count SQL statements; write the totals to this file")
    p = sub.add_parser("run")
    p.add_argument("--citizens", type=int, default=500)
    p.add_argument("--url", default=None)
    p.add_argument("--no-faults", dest="faults", action="store_false")
    p.add_argument("--brain", default="auto", choices=["auto", "real", "stand-in"])
    p.add_argument("--arrival-rate", type=float, default=12.5)
    p.add_argument("--cap", type=float, default=120)
    p.add_argument("--bots", type=int, default=1, help="bots behind webhooks (1: one bot, long polling)")
    p.add_argument("--triage-server", action=argparse.BooleanOptionalAction, default=None,
                   help="one shared triage server for the bots (default: with 2 or more bots)")
    p.add_argument("--mix", default="conversations", choices=MIXES)
    p.add_argument("--per-citizen", type=int, default=2, help="requests each citizen writes")
    args = parser.parse_args(argv)
    if args.cmd == "serve-bot":
        serve_bot(
            args.db,
            args.api,
            args.brain,
            webhook=args.webhook,
            secret=args.secret,
            port=args.port,
            preload=args.preload,
            sql_stats=args.sql_stats,
        )
        return 0
    logging.basicConfig(level=logging.INFO)
    result = bench_e2e(
        args.citizens,
        args.url,
        faults=args.faults,
        brain=args.brain,
        arrival_rate=args.arrival_rate,
        duration_cap_s=args.cap,
        bots=args.bots,
        mix=args.mix,
        messages_per_citizen=args.per_citizen,
        triage_server=args.triage_server,
    )
    print(json.dumps(result, ensure_ascii=False, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
