"""The Telegram channel (python-telegram-bot 22): thin handlers that translate updates into
``Incoming``, call the plain conversation functions, and send the ``Reply`` objects back.

Replies to the chat a person just wrote in are sent at once (the first reply must be fast: an
emergency's "call 119" cannot wait); if Telegram refuses or fails, the reply is put in the outbox and
retried. Every other message (to unit and center groups, progress to citizens) goes through the
outbox, flushed by a repeating job.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from telegram import (
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    KeyboardButton,
    ReplyKeyboardMarkup,
    ReplyKeyboardRemove,
    Update,
)
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TimedOut
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    ContextTypes,
    ExtBot,
    MessageHandler,
    filters,
)
from telegram.request import HTTPXRequest

from bot import texts
from bot.citizen import handle_citizen
from bot.inbox import (
    Overtaken,
    Replayed,
    Step,
    StepSessions,
    is_disconnect,
    mark_done,
    pending_before,
    pending_updates,
    prune,
    record_updates,
    with_db_retry,
)
from bot.messages import URGENT, Incoming, Reply
from bot.outbox import GroupCommit, ResultRecorder, SendResult, deliver_due, enqueue
from bot.services import Services
from bot.triage_process import TriageUnavailable, own_process
from models.clock import now
from models.privacy import mask_text
from models.settings import get_settings
from models.tables import OutboxMessage

log = logging.getLogger(__name__)
OUTBOX_INTERVAL = 1.0
try:  # issue 8: httpcore 1.0 tries `import sniffio` on every request; when it is not installed each failed
    import sniffio  # noqa: F401  import walks sys.path on disk (0.05-0.7 ms a request measured here).
except ImportError:  # Note its absence once, as a finished import would.
    sys.modules["sniffio"] = None  # type: ignore[assignment]
QUEUE_NOTICE_EVERY = 60.0  # seconds: a chat is told its message waits in a queue at most this often
SLOW_STEP = 2.0  # seconds from update to first reply worth a warning in the log
# issue 8: where a citizen's wait for the first reply went, step by step, for `hotline bench e2e` (its bot
# process sets a list here; None, the product's default, records nothing): (arrival as wall-clock time,
# seconds for the chat's lock and the triage model, waiting for a step worker, the step, sending)
STEP_STAGES: list[tuple[float, float, float, float, float]] | None = None
RECOVER_EVERY = 5.0  # seconds between looks for updates left pending (issue 8)
# issue 8: a step that met a database or triage outage is tried again this often, for this long (a database
# restart, a triage server loading its model), holding its chat's place; then it is left for the replay
STEP_RETRY_EVERY = 1.0
STEP_RETRY_FOR = 30.0
_GAVE_UP = object()  # _run_step's result when the step did not run
RECOVER_AFTER = timedelta(seconds=60)  # an update pending this long is taken as abandoned
# conversation states in which a citizen's text answers a question (bot/citizen.py ``_text``), so it is not
# triaged as a new request; in any other state (or an unknown one) text is worth triaging ahead (issue 8)
ANSWER_STATES = frozenset(
    {
        "ask_number",
        "add_info",
        "unsatisfied_reason",
        "ask_place",
        "ask_time",
        "ask_contact",
        "edit_text",
        "confirm",
    }
)


# --------------------------------------------------------------------------- update → Incoming


def to_incoming(update: Update) -> Incoming | None:
    """Translate a Telegram update into the channel-neutral form (None for updates we ignore)."""
    incoming = _to_incoming(update)
    if incoming is None:
        return None
    # issue 8: NUL cannot be stored in PostgreSQL text (the whole step would fail); nothing needs it
    changes = {
        f.name: value.replace("\x00", "")
        for f in fields(incoming)
        if isinstance(value := getattr(incoming, f.name), str) and "\x00" in value
    }
    return replace(incoming, **changes) if changes else incoming


def _to_incoming(update: Update) -> Incoming | None:
    chat = update.effective_chat
    user = update.effective_user
    if chat is None or user is None:
        return None
    base: dict[str, Any] = dict(
        channel="telegram",
        chat_id=str(chat.id),
        user_id=str(user.id),
        chat_type=chat.type,
        display_name=user.full_name or "",
    )
    if update.callback_query is not None:
        q = update.callback_query
        return Incoming(
            **base, callback=q.data or "", callback_message_id=q.message.message_id if q.message else None
        )
    msg = update.effective_message
    if msg is None:
        return None
    if msg.text is not None:
        text = msg.text
        if text.startswith("/"):
            head, _, args = text[1:].partition(" ")
            command = head.split("@", 1)[0].lower()
            return Incoming(**base, command=command, args=args.strip(), text=text)
        return Incoming(**base, text=text)
    if msg.contact is not None:
        c = msg.contact
        name = " ".join(p for p in (c.first_name, c.last_name) if p)
        return Incoming(
            **base,
            contact_name=name,
            contact_phone=c.phone_number,
            contact_user_id=str(c.user_id) if c.user_id else None,
        )
    if msg.location is not None:
        return Incoming(**base, latitude=msg.location.latitude, longitude=msg.location.longitude)
    if msg.photo:
        return Incoming(**base, photo=msg.photo[-1].file_id, caption=msg.caption)
    for kind in ("sticker", "voice", "audio", "video", "video_note", "animation", "document"):
        if getattr(msg, kind, None) is not None:
            return Incoming(**base, other=kind, caption=msg.caption)
    if msg.new_chat_members or msg.left_chat_member:
        return None
    return Incoming(**base, other="unknown")


# --------------------------------------------------------------------------- Reply → Telegram


def _markups(reply: Reply) -> list[Any]:
    """Telegram allows one keyboard per message: inline buttons, or a reply keyboard, or a removal."""
    out: list[Any] = []
    if reply.ask_contact or reply.ask_location:
        rows = []
        if reply.ask_location:
            rows.append([KeyboardButton("📍 发送位置", request_location=True)])
        if reply.ask_contact:
            rows.append([KeyboardButton("📱 分享手机号", request_contact=True)])
        out.append(ReplyKeyboardMarkup(rows, resize_keyboard=True, one_time_keyboard=True))
    if reply.buttons:
        out.append(
            InlineKeyboardMarkup(
                [[InlineKeyboardButton(b.label, callback_data=b.data) for b in row] for row in reply.buttons]
            )
        )
    if not out and reply.remove_keyboard:
        out.append(ReplyKeyboardRemove())
    return out


FOLLOW_UP = "也可以点按钮："


class PartlySent(Exception):
    """The first message of a two-message Reply went out, the inline buttons did not (issue 8: retrying
    the whole Reply would send the first message twice)."""

    def __init__(self, message_id: int, rest: Reply) -> None:
        super().__init__("inline buttons not sent")
        self.message_id, self.rest = message_id, rest


async def send_reply(bot, chat_id: int | str, reply: Reply) -> int | None:
    """Send one Reply (two messages when it needs both a reply keyboard and inline buttons)."""
    markups = _markups(reply)
    if reply.edit_message_id:
        inline = next((m for m in markups if isinstance(m, InlineKeyboardMarkup)), None)
        try:
            msg = await bot.edit_message_text(
                chat_id=chat_id, message_id=reply.edit_message_id, text=reply.text, reply_markup=inline
            )
            return getattr(msg, "message_id", reply.edit_message_id)
        except BadRequest as err:
            if "not modified" in str(err).lower():
                return reply.edit_message_id
            raise
    if not markups:
        markups = [None]
    first = None
    for i, markup in enumerate(markups):
        text = reply.text if i == 0 else FOLLOW_UP
        try:
            msg = await bot.send_message(chat_id=chat_id, text=text[:4096], reply_markup=markup)
        except Exception as err:
            if first is None:
                raise
            # only the inline buttons can come second (_markups puts the reply keyboard first)
            raise PartlySent(first, Reply(FOLLOW_UP, buttons=reply.buttons)) from err
        first = first or msg.message_id
    return first


async def send_reply_result(bot, chat_id: int | str, reply: Reply) -> SendResult:
    """Send one Reply and say how it went, without raising (retryable, permanent, or retry after N s)."""
    try:
        return SendResult(ok=True, message_id=await send_reply(bot, chat_id, reply))
    except PartlySent as part:  # the rest goes to the outbox as a message of its own
        return SendResult(ok=True, message_id=part.message_id, rest=part.rest, error=repr(part.__cause__))
    except RetryAfter as err:
        ra = err.retry_after
        seconds = ra.total_seconds() if hasattr(ra, "total_seconds") else float(ra)
        return SendResult(ok=False, retry_after=seconds, error=str(err))
    except Forbidden as err:  # blocked by the user, kicked from the group: retrying cannot help
        return SendResult(ok=False, permanent=True, error=str(err))
    except BadRequest as err:
        return SendResult(ok=False, permanent="chat not found" in str(err).lower(), error=str(err))
    except (TimedOut, NetworkError) as err:
        return SendResult(ok=False, error=str(err))


async def send_outbox_message(bot, msg: OutboxMessage) -> SendResult:
    markup = msg.markup or {}
    if markup.get("photo") and Path(markup["photo"]).exists():
        try:
            with open(markup["photo"], "rb") as fh:
                sent = await bot.send_photo(chat_id=msg.chat_id, photo=fh, caption=msg.text[:1000])
            return SendResult(ok=True, message_id=sent.message_id)
        except RetryAfter as err:
            ra = err.retry_after
            seconds = ra.total_seconds() if hasattr(ra, "total_seconds") else float(ra)
            return SendResult(ok=False, retry_after=seconds, error=str(err))
        except Forbidden as err:
            return SendResult(ok=False, permanent=True, error=str(err))
        except (BadRequest, TimedOut, NetworkError) as err:
            return SendResult(ok=False, error=str(err))
    reply = Reply.from_markup(msg.text, markup, edit_message_id=msg.edit_message_id)
    return await send_reply_result(bot, msg.chat_id, reply)


# --------------------------------------------------------------------------- the application


class FloodGuard:
    """At most ``limit`` messages per ``window`` seconds per user; others are answered politely, once a
    window (issue 8: a notice per extra message would flood the flooder back and spend our Telegram quota)."""

    def __init__(self, limit: int = 8, window: float = 10.0) -> None:
        self.limit, self.window = limit, window
        self.seen: dict[str, deque[float]] = defaultdict(deque)
        self.noticed: dict[str, float] = {}

    def allow(self, user_id: str) -> bool:
        now = time.monotonic()
        q = self.seen[user_id]
        while q and now - q[0] > self.window:
            q.popleft()
        if len(q) >= self.limit:
            return False
        q.append(now)
        return True

    def first_refusal(self, user_id: str) -> bool:
        """True for the first refused message of a window: the one that gets the polite notice."""
        now = time.monotonic()
        if now - self.noticed.get(user_id, -1e9) < self.window:
            return False
        self.noticed[user_id] = now
        return True


def _passing(err: BaseException) -> bool:
    """An outage that the same update may not meet again later: the database's or the triage model's."""
    return is_disconnect(err) or isinstance(err, TriageUnavailable)


def quick_emergency(incoming: Incoming) -> Any | None:
    """The emergency screen of triage (regular expressions, well under a millisecond), run before the step
    so that "call 119" goes out at once, ahead of the database and of any queue (issue 8). Returns the
    ``triage.screening.Emergency`` or None."""
    text = incoming.text or incoming.caption
    if not incoming.is_private or not text or incoming.command:
        return None
    try:
        from triage.screening import detect_emergency

        return detect_emergency(text[:2000])
    except Exception:  # the screen is an optimisation; the step's own triage decides
        log.debug("quick emergency screen failed", exc_info=True)
        return None


class EarlyNotice(NamedTuple):
    """An emergency notice sent before the step (the line it names, the notice, how its send went)."""

    line: str
    reply: Reply
    result: SendResult


async def _send_notice(bot, chat_id: str, emergency: Any) -> EarlyNotice:
    notice = Reply(texts.emergency(emergency.line, emergency.label_zh), urgent=True)
    return EarlyNotice(emergency.line, notice, await send_reply_result(bot, chat_id, notice))


def _same_notice(reply: Reply, line: str) -> bool:
    """Is this the step's own emergency notice for ``line`` (already sent before the step)?"""
    return reply.chat_id is None and reply.text.split("\n", 1)[0] == texts.emergency(line).split("\n", 1)[0]


# --------------------------------------------------------------------------- the inbox (issue 8)


class Inbox:
    """Writes updates to the database before Telegram is told they arrived (see bot/inbox.py)."""

    def __init__(self, factory) -> None:
        self.factory = factory
        self.accepts: Callable[[Update], bool] = lambda _u: True  # set to "one of our handlers takes it"
        # called with the new updates before they are written (the emergency notices go out meanwhile)
        self.on_arrival: Callable[[list[Update]], None] = lambda _updates: None
        self._known: set[int] = set()
        self._order: deque[int] = deque()
        # issue 8: webhook updates arriving while one transaction is written go together in the next (one
        # transaction per webhook update cost more than the update's step)
        self._write = GroupCommit(self._record_all)

    def remember(self, update_id: int) -> None:
        if update_id in self._known:
            return
        self._known.add(update_id)
        self._order.append(update_id)
        while len(self._order) > 20_000:
            self._known.discard(self._order.popleft())

    async def record(self, updates: list[Update] | tuple[Update, ...]) -> None:
        fresh = [u for u in updates if u.update_id not in self._known and self.accepts(u)]
        if fresh:
            self.on_arrival(fresh)
        items = [(u.update_id, str(u.effective_chat.id) if u.effective_chat else None, u.to_dict()) for u in fresh]
        if items:
            try:
                await self._write(items)
            except Exception as err:
                # not recorded, so not acknowledged: Telegram gives the updates again on the next call
                raise NetworkError(f"inbox unavailable ({type(err).__name__})") from err
        for u in updates:
            self.remember(u.update_id)

    def _record_all(self, groups: list[list[tuple[int, str | None, dict]]]) -> None:
        rows = [item for items in groups for item in items]
        with_db_retry(partial(record_updates, self.factory, rows), attempts=6)


class DurableBot(ExtBot):
    """The bot, whose getUpdates records what it receives before the next call acknowledges it."""

    def __init__(self, *args: Any, inbox: Inbox | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inbox = inbox  # underscore: PTB objects refuse other new attributes

    async def get_updates(self, *args: Any, **kwargs: Any) -> tuple[Update, ...]:
        updates = await super().get_updates(*args, **kwargs)
        if updates and self._inbox is not None:
            await self._inbox.record(updates)
        return updates


class DurableQueue(asyncio.Queue):
    """The update queue; a webhook update is recorded before the webhook answers 200."""

    def __init__(self, inbox: Inbox) -> None:
        super().__init__()
        self.inbox = inbox

    async def put(self, item: Any) -> None:
        if isinstance(item, Update):
            await self.inbox.record([item])
        await super().put(item)


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


SMOOTHING = 0.3  # weight of the newest measurement in the smoothed speeds behind the expected waits


def _smoothed(previous: float | None, sample: float) -> float:
    """Exponentially smoothed ``sample`` (the first one taken as it is)."""
    return sample if previous is None else previous + SMOOTHING * (sample - previous)


class BatchingTriage:
    """issue 8: the triage model answers several messages at once far more cheaply than one by one
    (e5-small on this machine: 36 ms of CPU per message alone, 17 ms in fours, 7 ms in sixteens). Steps
    running at the same time hand their texts to whichever of them calls first, which runs them as one
    batch; whoever arrives meanwhile waits for the next batch. Nothing waits when there is no queue.

    ``prefetch(text)`` starts a message's triage as soon as the update arrives, before its step has a
    worker or a database connection (the channel calls it for plain text that will most likely be a new
    request): messages arriving together are triaged together by one background runner, however few step
    workers there are, and the step later finds its result ready. A prefetched result nobody asks for is
    forgotten after ``PREFETCH_TTL`` seconds.

    ``expected_wait(text)`` estimates how long a prefetched text will wait for its answer from the queue ahead
    of it and the model's recent seconds per message, so the channel can tell a citizen at once that a peak of
    messages holds theirs up (``texts.QUEUED``)."""

    PREFETCH_TTL = 60.0
    PER_TEXT_GUESS = 0.05  # seconds per message before any batch was timed

    def __init__(
        self,
        brain: Callable[[str], dict[str, Any]],
        many: Callable[[list[str]], list[dict]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.brain, self.many, self.clock = brain, many, clock
        self.max_batch = 16
        self.per_text: float | None = None  # smoothed seconds per message of the batches run since loading
        self._loading = self._loaded = False
        self._in_flight = 0  # texts in the batch being run
        self._cond = threading.Condition()
        self._queue: list[tuple[str, dict[str, Any]]] = []
        self._busy = False
        self._prefetched: dict[str, tuple[float, dict[str, Any]]] = {}
        self._runner: ThreadPoolExecutor | None = None
        self._runner_queued = False
        self.batches: deque[int] = deque(maxlen=1000)  # sizes of the last batches (for profiling)
        embed = getattr(brain, "embed", None)
        if callable(embed):  # similar tickets compare the vectors triage made (bot/citizen.py)
            self.embed = embed

    def load(self) -> None:
        load = getattr(self.brain, "load", None)
        self._loading = True
        try:
            if callable(load):
                load()
        except BaseException:
            self._loading = False  # the first step that needs the model loads it: estimate waits as before
            raise
        self._loaded = True

    def expected_wait(self, text: str) -> float:
        """Seconds until ``text``'s prefetched triage is likely done: the texts ahead of it and its own, at the
        recent seconds per message (infinite while the model is still loading; 0 when not queued)."""
        with self._cond:
            if self._loading and not self._loaded:
                return float("inf")
            found = self._prefetched.get(text)
            if found is None or "result" in found[1]:
                return 0.0
            slot = found[1]
            position = next((i for i, (_, s) in enumerate(self._queue) if s is slot), None)
            ahead = self._in_flight + (position + 1 if position is not None else 0)
            return ahead * (self.per_text if self.per_text is not None else self.PER_TEXT_GUESS)

    def prefetch(self, text: str) -> None:
        """Start triaging ``text`` in the background (returns at once)."""
        with self._cond:
            if text in self._prefetched:
                return
            at = time.monotonic()
            if len(self._prefetched) > 256:
                for key, (t, slot) in list(self._prefetched.items()):
                    if at - t > self.PREFETCH_TTL and "result" in slot:
                        del self._prefetched[key]
            slot: dict[str, Any] = {}
            self._prefetched[text] = (at, slot)
            self._queue.append((text, slot))
            if not self._busy and not self._runner_queued:
                if self._runner is None:
                    self._runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotline-triage")
                self._runner_queued = True
                self._runner.submit(self._run_queued)

    def _run_queued(self) -> None:
        with self._cond:
            self._runner_queued = False
            while self._queue and not self._busy:
                self._run_batch()

    def _run_batch(self) -> None:
        """Run the next batch (called holding the lock, which is released during the model call)."""
        self._busy = True
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        self._in_flight = len(batch)
        results: list[Any] = [RuntimeError("triage interrupted")] * len(batch)
        timed = self._loaded or not self._loading  # one that waited for the model to load: not its speed
        started = self.clock()
        self._cond.release()
        try:
            out = list(self.many([t for t, _ in batch]))
            if len(out) != len(batch):
                raise RuntimeError(f"triage_many gave {len(out)} results for {len(batch)} texts")
            results = out
        except Exception as err:  # each caller gets the error, as a lone call would
            results = [err] * len(batch)
            timed = False
        finally:
            self._cond.acquire()
            if timed:
                self.per_text = _smoothed(self.per_text, (self.clock() - started) / len(batch))
            self._in_flight = 0
            self.batches.append(len(batch))
            for (_, waiting), result in zip(batch, results, strict=True):
                waiting["result"] = result
                for loop, fut in waiting.pop("waiters", ()):
                    loop.call_soon_threadsafe(_wake, fut)
            self._busy = False
            if self._queue and self._runner is not None and not self._runner_queued:
                self._runner_queued = True  # prefetched texts queued meanwhile need no caller to run them
                self._runner.submit(self._run_queued)
            self._cond.notify_all()

    def ready(self, text: str) -> asyncio.Future | None:
        """A future that is done when ``text``'s prefetched triage is (None: not prefetched, or done already).
        The channel awaits it before the step takes a worker, so no worker sits waiting for the model."""
        loop = asyncio.get_running_loop()
        with self._cond:
            found = self._prefetched.get(text)
            if found is None or "result" in found[1]:
                return None
            fut = loop.create_future()
            found[1].setdefault("waiters", []).append((loop, fut))
            return fut

    def __call__(self, text: str) -> dict[str, Any]:
        with self._cond:
            found = self._prefetched.pop(text, None)
            if found is not None and not isinstance(found[1].get("result", None), Exception):
                slot = found[1]
            else:  # not prefetched (or its batch failed: try again)
                slot = {}
                self._queue.append((text, slot))
            while "result" not in slot:
                if self._busy:
                    self._cond.wait()
                    continue
                self._run_batch()  # this caller runs the next batch (its own text is in it or a later one)
        if isinstance(slot["result"], Exception):
            raise slot["result"]
        return slot["result"]

    @classmethod
    def wrap(cls, brain: Any) -> Any:
        """Batching for a brain that can triage many texts at once (ProductBrain, bot/services.py); other
        triage functions unchanged."""
        many = getattr(brain, "triage_many", None)
        return cls(brain, many) if callable(many) else brain


class StepLoad:
    """issue 8: how many citizen steps wait for one of the step workers, and how long a step has taken lately
    (smoothed), so the channel can tell at once how long a new message will likely wait for a worker."""

    def __init__(self, workers: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.workers, self.clock = workers, clock
        self.waiting = 0
        self.per_step = 0.0
        self._lock = threading.Lock()

    def wrap(self, run: Callable[[], Any]) -> Callable[[], Any]:
        """``run`` counted as waiting from now until a worker starts it, and timed while it runs."""
        with self._lock:
            self.waiting += 1

        def counted() -> Any:
            with self._lock:
                self.waiting = max(0, self.waiting - 1)
            started = self.clock()
            try:
                return run()
            finally:
                took = self.clock() - started
                with self._lock:
                    self.per_step = _smoothed(self.per_step, took)

        return counted

    def expected_wait(self) -> float:
        """Seconds a step queued now would likely wait for a worker and run."""
        with self._lock:
            return (self.waiting // self.workers + 1) * self.per_step


class HotlineBot:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.flood = FloodGuard()
        self.inbox = Inbox(services.sessions)
        self.recorder = ResultRecorder(services.sessions)
        # issue 8: steps run in their own workers; emergencies in two more, so they never queue behind a
        # flood of ordinary requests (together with the default pool, within the database's 15 connections)
        self.steps = ThreadPoolExecutor(
            max_workers=get_settings().step_workers, thread_name_prefix="hotline-step"
        )
        self.step_load = StepLoad(get_settings().step_workers)
        self.urgent = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hotline-urgent")
        self.started_at = now()
        self._recovered_once = False
        self._tasks: set[asyncio.Task] = set()
        self._last_prune = 0.0
        self.chat_states: OrderedDict[str, str] = OrderedDict()  # chat -> state after its last step (a hint)
        self.app: Application | None = None  # set by build_application (a stopping bot tries no step again)
        # update id -> its emergency notice being sent since the update arrived, or None: screened on arrival,
        # no emergency (see ``notice_on_arrival``)
        self.early_notices: OrderedDict[int, asyncio.Task | None] = OrderedDict()
        self.queue_noticed: OrderedDict[str, float] = OrderedDict()  # chat -> when it was last told to wait

    def handle(self, incoming: Incoming) -> list[Reply]:
        """Route to the citizen's or the government side's conversation (plain, blocking)."""
        if incoming.is_private and incoming.command not in ("bind", "join"):
            return handle_citizen(self.services, incoming)
        from bot.staff import handle_group

        return handle_group(self.services, incoming)

    async def post_init(self, app: Application) -> None:
        """Start loading the triage model (20-30 s) in the background: the bot answers from the first
        second (emergency notices never need the model); steps that need triage wait for it (issue 8)."""
        load = getattr(self.services.triage, "load", None)
        if callable(load):  # a failure shows again (and is reported) in the first step that needs it
            self._background(asyncio.to_thread(load), "could not load the triage model", logging.ERROR)

    async def post_shutdown(self, app: Application) -> None:
        """Stop the triage process, if the model runs in one (bot/triage_process.py)."""
        brain = getattr(self.services.triage, "brain", self.services.triage)
        close = getattr(brain, "close", None)
        if callable(close):
            await asyncio.to_thread(close)

    def notice_on_arrival(self, bot, updates: list[Update]) -> None:
        """issue 8: an emergency's notice goes out as its update arrives, while the update is being written to
        the database, not after: a database that is down or restarting must not hold up "call 119" (the
        update is acknowledged only once written; if that fails Telegram gives it again, and the notice already
        on its way for that update id is not sent a second time)."""
        for update in updates:
            if update.update_id in self.early_notices:
                continue
            incoming = None if update.callback_query is not None else to_incoming(update)
            emergency = quick_emergency(incoming) if incoming is not None else None
            self.early_notices[update.update_id] = (
                None
                if emergency is None
                else asyncio.get_running_loop().create_task(_send_notice(bot, incoming.chat_id, emergency))
            )
            while len(self.early_notices) > 10_000:  # updates that never reached a handler
                self.early_notices.popitem(last=False)

    async def _early_notice(self, bot, update_id: int, incoming: Incoming) -> EarlyNotice | None:
        """The emergency notice of this update: the one sent on its arrival, or sent now (an update that came
        without the screen on arrival, e.g. a replayed one)."""
        if update_id in self.early_notices:
            task = self.early_notices.pop(update_id)
            return None if task is None else await task
        emergency = quick_emergency(incoming)
        return await _send_notice(bot, incoming.chat_id, emergency) if emergency is not None else None

    async def on_update(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        arrived = time.monotonic()
        incoming = to_incoming(update)
        if incoming is None:
            await self._mark(update.update_id, "ignored")
            return
        if update.callback_query is not None:  # issue 8: answered beside the step, not before it
            self._background(update.callback_query.answer(), "could not answer callback query")
            if not 0 < len((incoming.callback or "").encode()) <= 64:  # Telegram's limits: forged
                from bot.staff_texts import STALE_GENERIC

                stale = texts.STALE_BUTTON if incoming.is_private else STALE_GENERIC
                await self._send_or_queue(context.bot, incoming, [Reply(stale)])
                await self._mark(update.update_id, "ignored")
                return
        early = await self._early_notice(context.bot, update.update_id, incoming)  # first, whatever else goes on
        if incoming.is_private and not self.flood.allow(incoming.user_id):
            if early is not None and not early.result.ok:  # no step will queue it: queue it here
                await asyncio.to_thread(self._queue, incoming.chat_id, early.reply)
            elif early is None and self.flood.first_refusal(incoming.user_id):
                await self._send_or_queue(context.bot, incoming, [Reply(texts.FLOOD)])
            await self._mark(update.update_id, "flood")
            return
        prefetched = self._prefetch_triage(incoming)
        if incoming.is_private and early is None and not incoming.callback and not incoming.command:
            self._tell_if_queued(context.bot, incoming.chat_id, prefetched)
        async with self.locks[incoming.chat_id]:
            await self._step(context.bot, update.update_id, incoming, arrived, early, prefetched)

    async def _step(
        self,
        bot,
        update_id: int,
        incoming: Incoming,
        arrived: float,
        early: EarlyNotice | None = None,
        prefetched: str | None = None,
    ) -> None:
        """The update's step, its chat's lock held."""
        if incoming.is_private and incoming.command not in ("bind", "join"):
            if prefetched is not None:  # the model's answer first, then a worker (never one idle waiting)
                ready = self.services.triage.ready(prefetched)
                if ready is not None:
                    await ready
            await self._citizen_step(bot, update_id, incoming, arrived, early)
        else:
            await self._group_step(bot, update_id, incoming)

    async def _catch_up(self, bot, chat_id: str, update_id: int) -> None:
        """issue 8: run the chat's earlier updates still pending before ``update_id`` (``Overtaken``): held up
        in another bot process by an outage, or left by one that died. Whichever process runs one first does
        it; the other finds it done (the claim). Called with the chat's lock held."""
        payloads = await asyncio.to_thread(
            with_db_retry, partial(pending_before, self.services.sessions, chat_id, update_id)
        )
        for payload in payloads:
            update = Update.de_json(payload, bot)
            incoming = to_incoming(update)
            if incoming is None or incoming.chat_id != chat_id:
                continue
            log.info("chat %s: running earlier update %s before %s", chat_id, update.update_id, update_id)
            self.inbox.remember(update.update_id)
            early = await self._early_notice(bot, update.update_id, incoming)
            await self._step(bot, update.update_id, incoming, time.monotonic(), early)

    def _prefetch_triage(self, incoming: Incoming) -> str | None:
        """issue 8: start triaging a citizen's text now, batched with the others arriving, when the step will
        most likely triage it (a new request: the chat's last known state does not wait for an answer).
        Returns the text being triaged (None: nothing started)."""
        prefetch = getattr(self.services.triage, "prefetch", None)
        if prefetch is None or not incoming.is_private or incoming.command or incoming.callback:
            return None
        if incoming.text is None or self.chat_states.get(incoming.chat_id) in ANSWER_STATES:
            return None
        from bot.citizen import _clean, _has_words

        text = _clean(incoming.text)
        if text and len(text) <= texts.MAX_TEXT and _has_words(text):
            prefetch(text)
            return text
        return None

    def _tell_if_queued(self, bot, chat_id: str, prefetched: str | None) -> None:
        """issue 8: in a peak, a citizen's message can wait many seconds for the triage model (a new request,
        ``prefetched``) and then for a step worker; when the expected wait reaches the setting
        ``queue_notice_after_s`` the citizen is told at once that it was received (``texts.QUEUED``), at most
        once a minute per chat, so they do not write it again. Sent directly and not kept in the outbox: if it
        fails, the answer itself still comes."""
        after = get_settings().queue_notice_after_s
        if not after:
            return
        wait = self.step_load.expected_wait()
        triage_wait = getattr(self.services.triage, "expected_wait", None)
        if prefetched is not None and triage_wait is not None:
            wait += triage_wait(prefetched)
        if wait < after:
            return
        at = time.monotonic()
        if at - self.queue_noticed.get(chat_id, -QUEUE_NOTICE_EVERY) < QUEUE_NOTICE_EVERY:
            return
        self.queue_noticed[chat_id] = at
        self.queue_noticed.move_to_end(chat_id)
        while len(self.queue_noticed) > 10_000:
            self.queue_noticed.popitem(last=False)
        self._background(send_reply(bot, chat_id, Reply(texts.QUEUED)), "could not send the queue notice")

    def _note_state(self, chat_id: str, state: str | None) -> None:
        if state is None:
            return
        self.chat_states[chat_id] = state
        self.chat_states.move_to_end(chat_id)
        while len(self.chat_states) > 100_000:
            self.chat_states.popitem(last=False)

    async def _citizen_step(
        self, bot, update_id: int, incoming: Incoming, arrived: float, early: EarlyNotice | None
    ) -> None:
        """issue 8: the step, its "processed" mark and its replies commit together (bot/inbox.py); the
        replies are then sent at once and recorded as sent, or left to the outbox if that fails. An
        emergency notice already sent by ``on_update`` is recorded as sent, not sent again."""
        step = Step(update_id, incoming.chat_id, incoming.channel, in_order=True)
        urgent = early is not None
        times = [time.monotonic()]

        def run() -> list[Reply]:
            del times[1:]  # a step tried again after an outage is timed from its last try
            times.append(time.monotonic())
            try:
                return with_db_retry(partial(handle_citizen, self.services, incoming, step=step))
            finally:
                times.append(time.monotonic())

        replies = await self._run_step(bot, incoming, step, run, self.urgent if urgent else self.steps)
        if replies is _GAVE_UP:
            return
        self._note_state(incoming.chat_id, step.state)
        held: SendResult | None = None
        for reply, outbox_id in zip(replies, step.outbox_ids, strict=True):
            if held is not None:  # keep the order: the rest waits for the outbox with the failed one
                result = SendResult(ok=False, deferred=True, retry_after=held.retry_after or 2.0)
            elif early is not None and early.result.ok and _same_notice(reply, early.line):
                result, early = early.result, None
            else:
                result = await send_reply_result(bot, reply.chat_id or incoming.chat_id, reply)
                if not result.ok:
                    log.warning("direct send failed (%s); left to the outbox", mask_text(result.error or ""))
                    held = None if result.permanent else result
            # at once: a crash between sending and recording means the message is sent again
            await self.recorder.record(outbox_id, result)
            if len(times) == 3:
                times.append(time.monotonic())  # the first reply is out
        if len(times) < 4:
            return
        stages = (times[0] - arrived, times[1] - times[0], times[2] - times[1], times[3] - times[2])
        if STEP_STAGES is not None:
            STEP_STAGES.append((time.time() - (time.monotonic() - arrived), *stages))
        if times[3] - arrived > SLOW_STEP:
            log.warning(
                "slow step%s: %.2f s for the chat lock and triage, %.2f s waiting for a worker, %.2f s step, "
                "%.2f s send",
                " (urgent)" if urgent else "",
                *stages,
            )

    async def _group_step(self, bot, update_id: int, incoming: Incoming) -> None:
        """issue 8: staff steps go through the inbox like citizen steps: the update's "processed" mark, the
        step (bot/staff.py's transaction, held open by ``StepSessions``) and its replies commit together,
        so a replayed update changes nothing and a step cut short by a crash is done after the restart;
        the replies are then sent at once and recorded as sent, or left to the outbox."""
        from bot.staff import handle_group

        step = Step(update_id, incoming.chat_id, incoming.channel, in_order=True)

        def run() -> list[Reply] | None:
            holder = StepSessions(self.services.sessions, step)
            try:
                replies = handle_group(replace(self.services, sessions=holder), incoming)
            except Replayed:
                return None
            except BaseException:
                holder.discard()
                raise
            return holder.finish(replies)

        replies = await self._run_step(bot, incoming, step, partial(with_db_retry, run), None)
        if replies is _GAVE_UP or not replies:
            return
        held: SendResult | None = None
        for reply, outbox_id in zip(replies, step.outbox_ids, strict=True):
            if held is not None:  # keep the order: the rest waits for the outbox with the failed one
                result = SendResult(ok=False, deferred=True, retry_after=held.retry_after or 2.0)
            else:
                result = await send_reply_result(bot, reply.chat_id or incoming.chat_id, reply)
                if not result.ok:
                    log.warning("direct send failed (%s); left to the outbox", mask_text(result.error or ""))
                    held = None if result.permanent else result
            await self.recorder.record(outbox_id, result)

    async def _run_step(self, bot, incoming: Incoming, step: Step, run: Callable[[], Any], executor) -> Any:
        """Run a step in ``executor``; returns its result, or ``_GAVE_UP``.

        When the chat has an earlier update still pending (``Overtaken``), that one runs first, once; then
        this step runs whatever became of it.

        issue 8: a step that meets a database or triage-model outage (beyond ``with_db_retry``'s quick
        retries) is tried again every ``STEP_RETRY_EVERY`` s for ``STEP_RETRY_FOR`` s, the person told once
        that the message is in. The chat's lock stays held meanwhile, so the chat's next messages wait behind
        it (a confirm press answered "busy" and then overtaken by the next message would find its buttons
        stale, and the request would never be filed). A longer outage leaves the update pending for the
        replay; any other error marks it failed (a bug would fail again)."""
        loop = asyncio.get_running_loop()
        update_id = step.update_id
        give_up = time.monotonic() + STEP_RETRY_FOR
        told = False
        while True:
            try:
                counted = self.step_load.wrap(run) if executor is self.steps else run
                return await loop.run_in_executor(executor, counted)
            except Overtaken:
                step.in_order = False  # once: an earlier update that cannot be done now must not block this one
                try:
                    await self._catch_up(bot, incoming.chat_id, update_id)
                except Exception:  # e.g. the database went away again: this step's own retries handle it
                    log.exception("chat %s: could not run the earlier updates first", incoming.chat_id)
                continue
            except Exception as err:
                passing = _passing(err)
                stopping = self.app is not None and not self.app.running  # the replay after the restart does it
                if not passing or stopping or time.monotonic() >= give_up:
                    log.exception("handler failed for chat %s", incoming.chat_id)
                    if not passing:
                        await self._mark(update_id, "failed")
                    if not told:
                        await self._send_or_queue(bot, incoming, [Reply(texts.BUSY)])
                    return _GAVE_UP
                log.warning(
                    "step for chat %s met an outage (%s); trying again", incoming.chat_id, type(err).__name__
                )
            if not told:
                told = True
                await self._send_or_queue(bot, incoming, [Reply(texts.BUSY)])
            await asyncio.sleep(STEP_RETRY_EVERY)

    def _background(self, coro, failure: str, level: int = logging.DEBUG) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:  # e.g. an expired callback query: it must not stop anything
                log.log(level, failure, exc_info=True)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mark(self, update_id: int, outcome: str) -> None:
        try:
            await asyncio.to_thread(
                with_db_retry, partial(mark_done, self.services.sessions, update_id, outcome)
            )
        except Exception:
            log.exception("could not mark update %s %s", update_id, outcome)

    async def _send_or_queue(self, bot, incoming: Incoming, replies: list[Reply]) -> None:
        for reply in replies:
            chat_id = reply.chat_id or incoming.chat_id
            try:
                await send_reply(bot, chat_id, reply)
            except Forbidden:
                log.info("chat %s has blocked the bot; reply dropped", chat_id)
            except Exception as err:
                log.warning("direct send failed (%s); queued in the outbox", mask_text(str(err)))
                try:
                    await asyncio.to_thread(self._queue, chat_id, reply)
                except Exception:
                    log.exception("could not queue a reply for chat %s", chat_id)

    def _queue(self, chat_id: str, reply: Reply) -> None:
        with self.services.sessions.begin() as s:
            enqueue(s, channel="telegram", chat_id=chat_id, reply=reply, kind=URGENT if reply.urgent else "retry")

    async def flush_outbox(self, context: ContextTypes.DEFAULT_TYPE) -> None:
        async def send(msg: OutboxMessage) -> SendResult:
            result = await send_outbox_message(context.bot, msg)
            if result.ok and msg.ticket_id is not None:
                # issue 8: where the card was posted is written with the "sent" record, in its transaction (it
                # had one of its own before that record, which cost a transaction per card and widened the
                # window in which a crash makes a delivered card go out again)
                from bot.staff import record_card_message

                result.after = partial(record_card_message, outbox_msg=msg, message_id=result.message_id)
            return result

        await deliver_due(self.services.sessions, "telegram", send, recorder=self.recorder)

    async def recover_updates(self, context: ContextTypes.DEFAULT_TYPE) -> None:
        """issue 8: process updates recorded but never done — at start, those a killed predecessor left;
        afterwards, those pending for a minute (a peer process died, or the database was down)."""
        if self._recovered_once:
            before = now() - RECOVER_AFTER
        else:
            before = self.started_at
        payloads = await asyncio.to_thread(pending_updates, self.services.sessions, before)
        self._recovered_once = True
        for payload in payloads:
            update = Update.de_json(payload, context.bot)
            log.info("replaying update %s", update.update_id)
            self.inbox.remember(update.update_id)
            await context.application.update_queue.put(update)
        if time.monotonic() - self._last_prune > 600:
            self._last_prune = time.monotonic()
            await asyncio.to_thread(prune, self.services.sessions)


def _request(root: str, **kw: Any) -> Any:
    """issue 8: the lean Bot API client (bot/telegram_http.py: a fifth of httpx's CPU per call) for a Bot API
    server on plain HTTP — a local ``telegram-bot-api`` server next to the bot, the usual set-up for high
    volume, or the test server. The public HTTPS API, a proxy, or HOTLINE_TELEGRAM_HTTPX=1 use
    python-telegram-bot's own httpx client (TLS and proxies handled by a well-kept library)."""
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if proxied or not root.startswith("http://") or os.environ.get("HOTLINE_TELEGRAM_HTTPX") == "1":
        return HTTPXRequest(**kw)
    from bot.telegram_http import LeanRequest

    return LeanRequest(**kw)


def build_application(
    services: Services, token: str, *, base_url: str | None = None, outbox_interval: float = OUTBOX_INTERVAL
) -> tuple[Application, HotlineBot]:
    triage = services.triage
    if get_settings().triage_process:
        triage = own_process(triage)
    hb = HotlineBot(replace(services, triage=BatchingTriage.wrap(triage)))
    root = (base_url or "https://api.telegram.org").rstrip("/")
    bot = DurableBot(
        token,
        base_url=root + "/bot",
        base_file_url=root + "/file/bot",
        # issue 8: the timeouts add up to well under bot.inbox.REPLY_CLAIM and outbox.CLAIM_TIMEOUT
        # 16 connections (was 64): httpcore checks every pooled connection on each request, which cost more
        # than the requests themselves under load; 16 in flight is far above Telegram's 30 messages/s
        request=_request(
            root,
            connection_pool_size=16,
            read_timeout=10,
            write_timeout=10,
            connect_timeout=5,
            pool_timeout=5,
        ),
        get_updates_request=_request(root, connection_pool_size=1, read_timeout=40),
        inbox=hb.inbox,
    )
    builder = ApplicationBuilder().bot(bot).update_queue(DurableQueue(hb.inbox))
    # issue 8: 4096 (was 32): an update waiting for a slot cannot be recognised as an emergency, and
    # under a backlog every update should reach on_update; an update that waits costs one coroutine
    app = builder.concurrent_updates(4096).post_init(hb.post_init).post_shutdown(hb.post_shutdown).build()
    app.add_handler(CallbackQueryHandler(hb.on_update))
    app.add_handler(MessageHandler(filters.ALL & ~filters.StatusUpdate.ALL, hb.on_update))
    app.add_error_handler(_on_error)
    hb.inbox.accepts = lambda u: any(h.check_update(u) for h in app.handlers.get(0, []))
    hb.inbox.on_arrival = partial(hb.notice_on_arrival, bot)
    hb.app = app
    hb.recorder.stopping = lambda: not app.running
    if app.job_queue is not None:
        app.job_queue.run_repeating(hb.flush_outbox, interval=outbox_interval, first=0.5, name="outbox")
        app.job_queue.run_repeating(hb.recover_updates, interval=RECOVER_EVERY, first=0.3, name="inbox")
    return app, hb


async def _on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    log.error("telegram error: %s", mask_text(repr(context.error)))
