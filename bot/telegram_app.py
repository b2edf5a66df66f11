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
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

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
    MessageHandler,
    filters,
)
from telegram.request import HTTPXRequest

from bot import texts
from bot.citizen import handle_citizen
from bot.messages import Incoming, Reply
from bot.outbox import SendResult, deliver_due, enqueue
from bot.services import Services
from models.privacy import mask_text
from models.tables import OutboxMessage

log = logging.getLogger(__name__)
OUTBOX_INTERVAL = 1.0


# --------------------------------------------------------------------------- update → Incoming


def to_incoming(update: Update) -> Incoming | None:
    """Translate a Telegram update into the channel-neutral form (None for updates we ignore)."""
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
        text = reply.text if i == 0 else "也可以点按钮："
        msg = await bot.send_message(chat_id=chat_id, text=text[:4096], reply_markup=markup)
        first = first or msg.message_id
    return first


async def send_outbox_message(bot, msg: OutboxMessage) -> SendResult:
    markup = msg.markup or {}
    try:
        if markup.get("photo") and Path(markup["photo"]).exists():
            with open(markup["photo"], "rb") as fh:
                sent = await bot.send_photo(chat_id=msg.chat_id, photo=fh, caption=msg.text[:1000])
            return SendResult(ok=True, message_id=sent.message_id)
        reply = Reply.from_markup(msg.text, markup, edit_message_id=msg.edit_message_id)
        message_id = await send_reply(bot, msg.chat_id, reply)
        return SendResult(ok=True, message_id=message_id)
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


# --------------------------------------------------------------------------- the application


class FloodGuard:
    """At most ``limit`` messages per ``window`` seconds per user; others are answered politely."""

    def __init__(self, limit: int = 8, window: float = 10.0) -> None:
        self.limit, self.window = limit, window
        self.seen: dict[str, deque[float]] = defaultdict(deque)

    def allow(self, user_id: str) -> bool:
        now = time.monotonic()
        q = self.seen[user_id]
        while q and now - q[0] > self.window:
            q.popleft()
        if len(q) >= self.limit:
            return False
        q.append(now)
        return True


class HotlineBot:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.flood = FloodGuard()

    def handle(self, incoming: Incoming) -> list[Reply]:
        """Route to the citizen's or the government side's conversation (plain, blocking)."""
        if incoming.is_private and incoming.command not in ("bind", "join"):
            return handle_citizen(self.services, incoming)
        from bot.staff import handle_group

        return handle_group(self.services, incoming)

    async def on_update(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        incoming = to_incoming(update)
        if incoming is None:
            return
        if update.callback_query is not None:
            try:
                await update.callback_query.answer()
            except Exception:  # an expired query must not stop the step
                log.debug("could not answer callback query", exc_info=True)
        if incoming.is_private and not self.flood.allow(incoming.user_id):
            await self._send_or_queue(context.bot, incoming, [Reply(texts.FLOOD)])
            return
        async with self.locks[incoming.chat_id]:
            try:
                replies = await asyncio.to_thread(self.handle, incoming)
            except Exception:
                log.exception("handler failed for chat %s", incoming.chat_id)
                replies = [Reply(texts.BUSY)]
            await self._send_or_queue(context.bot, incoming, replies)

    async def _send_or_queue(self, bot, incoming: Incoming, replies: list[Reply]) -> None:
        for reply in replies:
            chat_id = reply.chat_id or incoming.chat_id
            try:
                await send_reply(bot, chat_id, reply)
            except Forbidden:
                log.info("chat %s has blocked the bot; reply dropped", chat_id)
            except Exception as err:
                log.warning("direct send failed (%s); queued in the outbox", mask_text(str(err)))
                await asyncio.to_thread(self._queue, chat_id, reply)

    def _queue(self, chat_id: str, reply: Reply) -> None:
        with self.services.sessions.begin() as s:
            enqueue(s, channel="telegram", chat_id=chat_id, reply=reply, kind="retry")

    async def flush_outbox(self, context: ContextTypes.DEFAULT_TYPE) -> None:
        async def send(msg: OutboxMessage) -> SendResult:
            result = await send_outbox_message(context.bot, msg)
            if result.ok and msg.ticket_id is not None:
                await asyncio.to_thread(self._record_card, msg, result.message_id)
            return result

        await deliver_due(self.services.sessions, "telegram", send)

    def _record_card(self, msg: OutboxMessage, message_id: int | None) -> None:
        from bot.staff import record_card_message

        with self.services.sessions.begin() as s:
            record_card_message(s, msg, message_id)


def build_application(
    services: Services, token: str, *, base_url: str | None = None, outbox_interval: float = OUTBOX_INTERVAL
) -> tuple[Application, HotlineBot]:
    builder = ApplicationBuilder().token(token).concurrent_updates(32)
    builder = builder.request(HTTPXRequest(connection_pool_size=64, read_timeout=15, write_timeout=15))
    builder = builder.get_updates_request(HTTPXRequest(read_timeout=40))
    if base_url:
        builder = builder.base_url(base_url.rstrip("/") + "/bot").base_file_url(
            base_url.rstrip("/") + "/file/bot"
        )
    app = builder.build()
    hb = HotlineBot(services)
    app.add_handler(CallbackQueryHandler(hb.on_update))
    app.add_handler(MessageHandler(filters.ALL & ~filters.StatusUpdate.ALL, hb.on_update))
    app.add_error_handler(_on_error)
    if app.job_queue is not None:
        app.job_queue.run_repeating(hb.flush_outbox, interval=outbox_interval, first=0.5, name="outbox")
    return app, hb


async def _on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    log.error("telegram error: %s", mask_text(repr(context.error)))
