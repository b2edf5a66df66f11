"""The citizen's conversation in a private chat, written once for every channel.

``handle_citizen(services, incoming) -> list[Reply]`` is a plain function: the Telegram handlers and
the console channel call it, and so do the tests.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import unicodedata
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import Select, and_, bindparam, literal, select
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from bot import texts
from bot.cards import center_review_card, unit_card
from bot.inbox import Step
from bot.messages import Button, Incoming, Reply
from bot.outbox import notify_unit
from bot.services import Services
from bot.staff import notify_rating, unit_view
from bot.state import ChatState, save_state, state_of
from models.catalog import CENTER
from models.clock import now
from models.errors import WorkflowError
from models.knowledge import KBEntry
from models.policy import Policy, load_policy
from models.privacy import mask_text, set_contact
from models.states import OPEN_STATES, STATUS_ZH
from models.tables import Attachment, Citizen, CitizenPII, Conversation, ScreeningEvent, Ticket, Unit
from models.workflow import (
    SYSTEM,
    TYPE_ZH,
    Actor,
    add_info,
    create_ticket,
    dispatch,
    find_repeat,
    flag_repeat,
    get_ticket,
    history,
    policy_of,
    rate,
    record_triage,
)
from triage.elements import extract_elements
from triage.similar import add_follower, followers, join_candidates, store_embedding

log = logging.getLogger(__name__)
_PHONE_IN_TEXT = re.compile(r"(1[3-9]\d{9}|0\d{2,3}-?\d{7,8})")
TIME_CHOICES = {"today": "今天", "recent": "最近几天", "long": "长期存在"}


def menu_buttons() -> list[list[Button]]:
    return [
        [Button("反映问题", "menu:report"), Button("咨询", "menu:ask")],
        [Button("查询进度", "menu:status"), Button("我的诉求", "menu:mine")],
    ]


@dataclass
class Ctx:
    services: Services
    session: Session
    msg: Incoming
    st: ChatState
    citizen: Citizen
    policy: Policy

    @property
    def actor(self) -> Actor:
        return Actor("citizen", str(self.citizen.id))


def get_or_create_citizen(session: Session, channel: str, external_id: str) -> Citizen:
    c = session.scalars(
        select(Citizen).where(Citizen.channel == channel, Citizen.external_id == str(external_id))
    ).one_or_none()
    return c if c is not None else _new_citizen(session, channel, external_id)


def _new_citizen(session: Session, channel: str, external_id: str) -> Citizen:
    c = Citizen(channel=channel, external_id=str(external_id), created_at=now())
    session.add(c)
    session.flush()
    return c


@lru_cache(maxsize=1)
def _citizen_and_state_query() -> Select:
    """The statement of :func:`_citizen_and_state`, built once (issue 8: building a statement and its cache key
    anew for every step cost more CPU than running it). Parameters: ``channel``, ``user``, ``chat``."""
    one = select(literal(1).label("one")).subquery()  # the row the three optional ones are joined to
    channel = bindparam("channel", type_=Citizen.__table__.c.channel.type)
    return (
        select(Citizen, Conversation, CitizenPII)
        .select_from(one)
        .outerjoin(Citizen, and_(Citizen.channel == channel, Citizen.external_id == bindparam("user")))
        .outerjoin(Conversation, and_(Conversation.channel == channel, Conversation.chat_id == bindparam("chat")))
        .outerjoin(CitizenPII, CitizenPII.citizen_id == Citizen.id)
    )


def _citizen_and_state(session: Session, msg: Incoming) -> tuple[Citizen, ChatState]:
    """The citizen (with the contact details they left, if any) and the chat's conversation state, read in one
    statement (issue 8: every step needs both, and each round trip under load is a wait for the database and
    then for the GIL); a citizen writing for the first time is created."""
    citizen, row, pii = session.execute(
        _citizen_and_state_query(), {"channel": msg.channel, "user": str(msg.user_id), "chat": str(msg.chat_id)}
    ).one()
    if citizen is None:
        citizen = _new_citizen(session, msg.channel, msg.user_id)
    if "pii" not in citizen.__dict__:  # read with it: asking for a contact, a card or a summary reads no more
        set_committed_value(citizen, "pii", pii)
    return citizen, state_of(row)


def handle_citizen(services: Services, msg: Incoming, *, step: Step | None = None) -> list[Reply]:
    """One step of the citizen's conversation; state is loaded and saved in the same transaction.

    With a ``step`` (issue 8, the Telegram channel), the update is marked processed and the replies are
    written to the outbox in that same transaction, so a replayed update changes nothing (it returns no
    replies: they are already in the outbox) and a crash before sending loses no reply.
    """
    with services.sessions.begin() as session:
        if step is not None and not step.claim(session):
            return []
        session.info["unit_factory"] = services.sessions  # the catalog is attached when a step needs it
        citizen, st = _citizen_and_state(session, msg)
        ctx = Ctx(services, session, msg, st, citizen, load_policy(services.policy_name))
        replies = _route(ctx)
        save_state(session, msg.channel, msg.chat_id, st)
        if step is not None:
            step.keep_replies(session, replies)
            step.state = st.state
        return replies


# issue 8: the unit catalog, read at most every UNIT_CACHE_S per session factory and put into each step's
# session without a query; a step used to read 2-10 unit rows one by one (the session's identity map holds
# rows weakly, so the same unit was read again and again). A catalog change reaches conversations within
# UNIT_CACHE_S (units are loaded by an administrator, rarely).
UNIT_CACHE_S = 30.0
_UNITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_UNITS_LOCK = threading.Lock()


def attach_units(session: Session, factory: Any, codes: Iterable[str] | None = None) -> None:
    """Put the cached catalog's units ``codes`` (None: all) into the step's session, so that
    ``session.get(Unit, code)`` finds them without a query; a code not in the catalog is left to the query."""
    try:
        cached = _UNITS.get(factory)
    except TypeError:  # not weakly referenceable: no cache
        return
    at = time.monotonic()
    if cached is None or at - cached[0] > UNIT_CACHE_S:
        with _UNITS_LOCK:
            cached = _UNITS.get(factory)
            if cached is None or at - cached[0] > UNIT_CACHE_S:
                with factory() as s:
                    rows = list(s.scalars(select(Unit)))
                    s.expunge_all()
                cached = (at, {u.code: u for u in rows})
                _UNITS[factory] = cached
    catalog = cached[1]
    # held by the session (strongly) for its life, so that session.get(Unit, code) finds them
    held = session.info.setdefault("units", {})
    for code in catalog if codes is None else codes:
        if code not in held and code in catalog:
            held[code] = session.merge(catalog[code], load=False)


def ensure_units(session: Session, codes: Iterable[str] | None = None) -> None:
    """Attach the cached units ``codes`` (None: the whole catalog) to this step's session the first time the
    step needs them (most steps — a place, a time, a rating — never do; merging the ~30 rows of the catalog cost
    a tenth of the bot's CPU under load, and merging all of them for a request that needs two or three still
    3 %)."""
    factory = session.info.get("unit_factory")
    if factory is not None:
        attach_units(session, factory, codes)


def forget_units() -> None:
    """Drop the cached catalog (after loading a new one in this process; tests)."""
    _UNITS.clear()


# --------------------------------------------------------------------------- routing


def _route(ctx: Ctx) -> list[Reply]:
    msg = ctx.msg
    if msg.command:
        return _command(ctx, msg.command, msg.args)
    if msg.callback:
        return _button(ctx, msg.callback)
    if msg.contact_phone:
        return _contact(ctx)
    if msg.latitude is not None and msg.longitude is not None:
        return _location(ctx)
    if msg.photo:
        return _photo(ctx)
    if msg.other:
        return [Reply(texts.UNSUPPORTED.get(msg.other, texts.UNSUPPORTED["unknown"]))]
    return _text(ctx, msg.text or "")


def _command(ctx: Ctx, command: str, args: str) -> list[Reply]:
    if command == "start":
        ctx.st.reset()
        return [Reply(texts.welcome(ctx.policy), buttons=menu_buttons(), remove_keyboard=False)]
    if command == "help":
        return [Reply(texts.HELP, buttons=menu_buttons())]
    if command == "cancel":
        had = ctx.st.state != "idle"
        ctx.st.reset()
        return [Reply(texts.CANCELLED if had else texts.NOTHING_TO_CANCEL, remove_keyboard=True)]
    if command == "status":
        number = args.strip()
        if not number:
            ctx.st.start("ask_number")
            return [Reply(texts.ASK_NUMBER)]
        return _status(ctx, number)
    if command in ("mine", "my"):
        return _my_tickets(ctx)
    return [Reply("这个命令我不认识。" + texts.HELP)]


def _button(ctx: Ctx, data: str) -> list[Reply]:
    parts = data.split(":")
    kind = parts[0]
    if kind == "menu":
        what = parts[1] if len(parts) > 1 else ""
        if what == "report":
            return [Reply("请直接描述您要反映的问题：什么时间、在哪里、发生了什么，可以附照片。")]
        if what == "ask":
            return [Reply("请输入您要咨询的问题，例如“居住证怎么办理”。")]
        if what == "status":
            ctx.st.start("ask_number")
            return [Reply(texts.ASK_NUMBER)]
        if what == "mine":
            return _my_tickets(ctx)
        return [Reply(texts.STALE_BUTTON)]
    if kind == "rate" and len(parts) == 3:
        return _rate(ctx, parts[1], parts[2])
    if kind == "add" and len(parts) == 2:
        return _start_add_info(ctx, parts[1])
    if kind == "show" and len(parts) == 2:
        return _status(ctx, parts[1])
    # everything else belongs to a step and carries that step's token
    token = parts[-1] if len(parts) >= 2 else ""
    if not token or token != ctx.st.token:
        if ctx.st.state == "confirm" and ctx.st.superseded(token):  # a summary shown before the content changed
            return [_summary(ctx, note=texts.SUMMARY_CHANGED)]
        return [Reply(texts.STALE_BUTTON)]
    if kind == "kb":
        return _kb_feedback(ctx, parts[1])
    if kind == "time":
        ctx.st.data["time"] = TIME_CHOICES.get(parts[1], parts[1])
        return _next_missing(ctx)
    if kind == "skip":
        ctx.st.data.setdefault("skipped", []).append(parts[1])
        return _next_missing(ctx)
    if kind == "type":
        if parts[1] in TYPE_ZH:
            ctx.st.data["type"] = parts[1]
            ctx.st.data["type_confirmed"] = True
        return [_summary(ctx)]
    if kind == "j" and len(parts) == 3:  # join an existing ticket about the same event
        return _join(ctx, parts[1])
    if kind == "d":  # draft actions
        action = parts[1]
        if action == "ok":
            return _submit(ctx)
        if action == "type":
            return [
                Reply(
                    "请选择诉求类型：",
                    buttons=[
                        [Button(zh, f"type:{t}:{ctx.st.token}") for t, zh in list(TYPE_ZH.items())[:3]],
                        [Button(zh, f"type:{t}:{ctx.st.token}") for t, zh in list(TYPE_ZH.items())[3:]],
                    ],
                )
            ]
        if action == "edit":
            ctx.st.data["editing"] = True
            ctx.st.state = "edit_text"
            return [Reply("请重新输入完整的诉求内容（会替换原内容）：")]
        if action == "cancel":
            ctx.st.reset()
            return [Reply(texts.CANCELLED, remove_keyboard=True)]
    return [Reply(texts.STALE_BUTTON)]


# --------------------------------------------------------------------------- free text


def _clean(text: str) -> str:
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C" or ch in "\n\t")
    return re.sub(r"[ \t]+", " ", text).strip()


def _has_words(text: str) -> bool:
    return any(unicodedata.category(ch)[0] in "LN" for ch in text)


def _text(ctx: Ctx, raw: str) -> list[Reply]:
    text = _clean(raw)
    if not text:
        return [Reply(texts.EMPTY)]
    if len(text) > texts.MAX_TEXT:
        return [Reply(texts.TOO_LONG.format(limit=texts.MAX_TEXT))]
    state = ctx.st.state
    if state == "ask_number":
        ctx.st.reset()
        return _status(ctx, text)
    if state == "add_info":
        return _finish_add_info(ctx, text)
    if state == "unsatisfied_reason":
        return _finish_unsatisfied(ctx, text)
    if state == "ask_place" and _has_words(text):
        ctx.st.data["place"] = text[:300]
        return _next_missing(ctx)
    if state == "ask_time" and _has_words(text):
        ctx.st.data["time"] = text[:200]
        return _next_missing(ctx)
    if state == "ask_contact":
        return _typed_contact(ctx, text)
    if state == "edit_text":
        ctx.st.data["text"] = text
        ctx.st.state = "confirm"
        el = extract_elements(text)
        ctx.st.data["place"] = el.place or ctx.st.data.get("place")
        ctx.st.data["time"] = el.time or ctx.st.data.get("time")
        return _next_missing(ctx)
    if state == "photo_wait" and _has_words(text):
        photos = ctx.st.data.get("photos", [])
        return _new_request(ctx, text, photos=photos)
    if not _has_words(text):
        return [Reply(texts.NO_TEXT_CONTENT)]
    if state == "confirm":
        # free text during confirmation adds to the content, and the summary says so: the citizen may have
        # written before seeing the question (a reply delayed by an outage, issue 8) and meant another matter.
        # The summaries shown before are superseded: a confirm press files only what its summary showed.
        ctx.st.data["text"] = (ctx.st.data.get("text", "") + "\n" + text).strip()
        ctx.st.renew_token()
        return [_summary(ctx, note=texts.TEXT_ADDED)]
    return _new_request(ctx, text)


def _new_request(ctx: Ctx, text: str, photos: list[str] | None = None) -> list[Reply]:
    result = ctx.services.triage(text)
    verdict = result.get("verdict")
    if verdict == "emergency":
        line = result.get("redirect") or "110"
        ctx.session.add(
            ScreeningEvent(
                at=now(),
                citizen_id=ctx.citizen.id,
                verdict="emergency",
                detail=line,
                text_masked=mask_text(text)[:2000],
            )
        )
        ctx.st.reset()
        log.info("emergency redirected to %s", line)
        return [Reply(texts.emergency(line, result.get("label", "")), urgent=True)]
    if verdict == "reject":
        key = result.get("key") or result.get("reason") or ""
        ex = ctx.policy.exclusion(key)
        ctx.session.add(
            ScreeningEvent(
                at=now(),
                citizen_id=ctx.citizen.id,
                verdict="reject",
                detail=key,
                text_masked=mask_text(text)[:2000],
            )
        )
        ctx.st.reset()
        if ex is None:
            return [Reply(texts.NO_TEXT_CONTENT)]
        return [Reply(texts.rejected(ex.wording, ex.go_to, ex.cite))]
    kb = result.get("kb")
    if kb and result.get("type") == "consultation":
        entry = ctx.session.get(KBEntry, kb["id"])
        if entry is not None and entry.is_answerable(now().date()):
            token = ctx.st.start(
                "kb_feedback", question=text, entry=entry.id, triage=_slim(result), photos=photos or []
            )
            ensure_units(ctx.session, [entry.unit])
            unit = ctx.session.get(Unit, entry.unit)
            source = f"来源：{unit.name if unit else entry.unit}，依据：{entry.basis or '—'}"
            source += f"（更新于 {entry.updated_at:%Y-%m-%d}）"
            return [
                Reply(
                    f"{entry.answer}\n\n{source}\n\n解决了吗？",
                    buttons=[
                        [Button("解决了", f"kb:yes:{token}"), Button("没解决，转人工办理", f"kb:no:{token}")]
                    ],
                )
            ]
    return _start_draft(ctx, text, result, photos or [])


def _slim(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("type", "units", "co_units", "confidence", "urgent", "urgent_level", "needs_review")
    return {k: result.get(k) for k in keys}


def _start_draft(ctx: Ctx, text: str, result: dict[str, Any], photos: list[str]) -> list[Reply]:
    el = extract_elements(text)
    ctx.st.start(
        "confirm",
        text=text,
        triage=_slim(result),
        type=result.get("type") or "help",
        units=list(result.get("units") or []),
        place=el.place,
        time=el.time,
        photos=photos,
        skipped=[],
    )
    return _next_missing(ctx)


def _kb_feedback(ctx: Ctx, answer: str) -> list[Reply]:
    data = dict(ctx.st.data)
    if answer == "yes":
        # an answered consultation is recorded as a ticket closed by the knowledge base
        t = create_ticket(
            ctx.session,
            text=data["question"],
            channel=ctx.msg.channel,
            citizen=ctx.citizen,
            policy=ctx.services.policy_name,
            actor=ctx.actor,
        )
        from models.workflow import answer_from_kb

        answer_from_kb(ctx.session, t, ctx.actor, entry_id=data["entry"], score=1.0)
        t.type = "consultation"
        ctx.st.reset()
        return [Reply(texts.KB_SOLVED)]
    return _start_draft(
        ctx, data["question"], {**data.get("triage", {}), "type": "consultation"}, data.get("photos", [])
    )


# --------------------------------------------------------------------------- the draft ticket


def _real_name_needed(ctx: Ctx) -> bool:
    pii = ctx.citizen.pii
    has_contact = pii is not None and bool(pii.phone)
    return ctx.st.data.get("type") in ctx.policy.real_name_required and not has_contact


def _next_missing(ctx: Ctx) -> list[Reply]:
    d = ctx.st.data
    token = ctx.st.token
    skipped = d.get("skipped", [])
    if not d.get("place") and "place" not in skipped:
        ctx.st.state = "ask_place"
        return [
            Reply(
                texts.ASK_PLACE,
                ask_location=True,
                buttons=[[Button("不涉及具体地点", f"skip:place:{token}")]],
            )
        ]
    if not d.get("time") and "time" not in skipped:
        ctx.st.state = "ask_time"
        return [
            Reply(
                texts.ASK_TIME,
                remove_keyboard=True,
                buttons=[[Button(v, f"time:{k}:{token}") for k, v in TIME_CHOICES.items()]],
            )
        ]
    if _real_name_needed(ctx) and "contact" not in skipped:
        ctx.st.state = "ask_contact"
        basis = ctx.policy.real_name_cite or ctx.policy.document
        return [Reply(texts.ASK_CONTACT.format(basis=basis), ask_contact=True)]
    ctx.st.state = "confirm"
    offer = _offer_join(ctx)
    if offer is not None:
        return [offer]
    return [_summary(ctx)]


def _embedding(ctx: Ctx, text: str):
    """The message's e5 vector from the product's triage (a cache hit: triage just embedded it), or None."""
    embed = getattr(ctx.services.triage, "embed", None)
    if embed is None:
        return None
    try:
        return embed(text)
    except Exception:  # similarity falls back to word overlap; a failed embedding never blocks a request
        log.warning("embedding for similar tickets failed", exc_info=True)
        return None


def _offer_join(ctx: Ctx) -> Reply | None:
    """An open ticket from another citizen about the same event at the same place: offer to follow it instead
    of filing a duplicate (the same broken streetlight reported by ten neighbours is one job for the unit)."""
    d = ctx.st.data
    if d.get("join_checked") or not d.get("place"):
        return None
    d["join_checked"] = True
    found = join_candidates(ctx.session, d.get("text", ""), _embedding(ctx, d.get("text", "")), ctx.citizen.id,
                            d.get("place"), now())
    if not found:
        return None
    t = found[0].ticket
    d["join_ticket"] = t.id
    token = ctx.st.token
    return Reply(
        texts.JOIN_OFFER.format(
            number=t.number, place=t.ev_place or "同一地点", status=STATUS_ZH.get(t.status, t.status),
            text=mask_text(t.original_text)[:80],
        ),
        remove_keyboard=True,
        buttons=[[Button(f"加入工单 {t.number}", f"j:ok:{token}"), Button("仍然新建工单", f"j:new:{token}")]],
    )


def _join(ctx: Ctx, action: str) -> list[Reply]:
    d = ctx.st.data
    if action != "ok" or not d.get("join_ticket"):
        return [_summary(ctx)]
    t = ctx.session.get(Ticket, d["join_ticket"])
    if t is None or t.status not in OPEN_STATES:  # closed meanwhile: file the citizen's own ticket
        return [Reply(texts.JOIN_CLOSED), _summary(ctx)]
    add_follower(ctx.session, t, ctx.citizen.id, d.get("text"))
    ctx.st.reset()
    return [
        Reply(
            texts.JOINED.format(number=t.number, status=STATUS_ZH.get(t.status, t.status)),
            remove_keyboard=True,
            buttons=[[Button("查看进度", f"show:{t.number}")]],
        )
    ]


def _unit_names(session: Session, codes: list[str]) -> list[str]:
    ensure_units(session, codes)
    names = []
    for code in codes:
        unit = session.get(Unit, code)
        names.append(unit.name if unit else code)
    return names


def _summary(ctx: Ctx, note: str | None = None) -> Reply:
    d = ctx.st.data
    token = ctx.st.token
    units = _unit_names(ctx.session, d.get("units", [])[:2]) or ["由热线中心指派"]
    lines = [note] if note else []
    lines += [
        "请确认您的诉求：",
        f"类型：{TYPE_ZH.get(d.get('type', ''), '待确认')}",
        f"内容：{d.get('text', '')[:300]}",
        f"地点：{d.get('place') or '未提供'}",
        f"时间：{d.get('time') or '未提供'}",
        f"建议承办单位：{'、'.join(units)}",
    ]
    if d.get("photos"):
        lines.append(f"附图：{len(d['photos'])}张")
    return Reply(
        "\n".join(lines),
        remove_keyboard=True,
        buttons=[
            [Button("✅ 确认提交", f"d:ok:{token}")],
            [
                Button("改类型", f"d:type:{token}"),
                Button("修改内容", f"d:edit:{token}"),
                Button("取消", f"d:cancel:{token}"),
            ],
        ],
    )


def _location(ctx: Ctx) -> list[Reply]:
    if ctx.st.state not in ("ask_place", "confirm", "ask_time", "ask_contact"):
        return [Reply("收到位置。请先描述您要反映的问题，我们会在需要地点时再请您发送。")]
    ctx.st.data["lat"], ctx.st.data["lon"] = ctx.msg.latitude, ctx.msg.longitude
    ctx.st.data["place"] = (
        ctx.st.data.get("place") or f"位置坐标 {ctx.msg.latitude:.5f},{ctx.msg.longitude:.5f}"
    )
    return _next_missing(ctx)


def _contact(ctx: Ctx) -> list[Reply]:
    msg = ctx.msg
    if msg.contact_user_id and msg.contact_user_id != msg.user_id:
        return [
            Reply(
                "请分享您本人的手机号（点下方“分享手机号”按钮），不要发送他人的联系方式。", ask_contact=True
            )
        ]
    set_contact(ctx.session, ctx.citizen, msg.contact_name or msg.display_name, msg.contact_phone)
    if ctx.st.state == "ask_contact":
        ctx.st.data.setdefault("skipped", []).append("contact")
        return _next_missing(ctx)
    return [Reply("已保存您的联系方式，仅用于办理和回访。", remove_keyboard=True)]


def _typed_contact(ctx: Ctx, text: str) -> list[Reply]:
    m = _PHONE_IN_TEXT.search(text)
    if not m:
        return [
            Reply(
                "没有识别到电话号码。请输入“姓名 电话”，例如“王先生 13812345678”，或点“分享手机号”。",
                ask_contact=True,
            )
        ]
    name = _clean(text.replace(m.group(0), "")) or None
    set_contact(ctx.session, ctx.citizen, name, m.group(0))
    ctx.st.data.setdefault("skipped", []).append("contact")
    return _next_missing(ctx)


def _photo(ctx: Ctx) -> list[Reply]:
    photo = ctx.msg.photo
    caption = _clean(ctx.msg.caption or "")
    if ctx.st.state in ("confirm", "ask_place", "ask_time", "ask_contact"):
        ctx.st.data.setdefault("photos", []).append(photo)
        replies = [Reply(texts.PHOTO_ADDED.format(n=len(ctx.st.data["photos"])))]
        if ctx.st.state == "confirm":
            ctx.st.renew_token()  # the summaries shown before did not count this photo
            replies.append(_summary(ctx))
        return replies
    if ctx.st.state == "add_info":
        number = ctx.st.data.get("number", "")
        ticket = _own_ticket(ctx, number)
        if ticket is not None:
            ctx.session.add(
                Attachment(
                    ticket_id=ticket.id,
                    kind="photo",
                    file_ref=photo,
                    caption=caption or None,
                    created_at=now(),
                )
            )
            add_info(ctx.session, ticket, ctx.actor, text=caption or "（补充图片）")
            ctx.st.reset()
            return [Reply(texts.ADD_INFO_DONE.format(number=number))]
    if caption and _has_words(caption):
        return _new_request(ctx, caption, photos=[photo])
    photos = ctx.st.data.get("photos", []) if ctx.st.state == "photo_wait" else []
    ctx.st.start("photo_wait", photos=[*photos, photo])
    return [Reply(texts.PHOTO_ONLY)]


def _submit(ctx: Ctx) -> list[Reply]:
    d = dict(ctx.st.data)
    s = ctx.session
    tri = d.get("triage") or {}
    ensure_units(s, [*d.get("units", []), *(tri.get("co_units") or []), CENTER])
    el = extract_elements(d["text"])  # written with the ticket's INSERT (issue 8: not an UPDATE after it)
    ticket = create_ticket(
        s,
        text=d["text"],
        channel=ctx.msg.channel,
        citizen=ctx.citizen,
        policy=ctx.services.policy_name,
        actor=ctx.actor,
        ev_place=d.get("place"),
        ev_time=d.get("time"),
        latitude=d.get("lat"),
        longitude=d.get("lon"),
        ev_person=el.person,
        ev_cause=el.cause,
        ev_process=el.process,
        ev_result=el.result,
    )
    for photo in d.get("photos", []):
        s.add(Attachment(ticket_id=ticket.id, kind="photo", file_ref=photo, created_at=now()))
    needs_review = bool(tri.get("needs_review")) and not d.get("type_confirmed")
    units = [u for u in d.get("units", []) if s.get(Unit, u) is not None and u != CENTER]
    record_triage(
        s,
        ticket,
        SYSTEM,
        type=d["type"],
        units=units,
        confidence=tri.get("confidence"),
        urgent_level=tri.get("urgent_level")
        or (tri.get("urgent") if isinstance(tri.get("urgent"), str) else None),
        needs_review=needs_review or not units,
    )
    emb = _embedding(ctx, d["text"])
    if emb is not None:
        store_embedding(s, ticket, emb, new_ticket=True)
    old = find_repeat(s, ticket)
    if old is not None:
        flag_repeat(s, ticket, old)
    ctx.st.reset()
    if needs_review or not units:
        notify_unit(
            s,
            CENTER,
            center_review_card(s, ticket, photos=len(d.get("photos", []))),
            ticket_id=ticket.id,
            kind="center_queue",
            dedupe_key=f"confirm:{ticket.id}",
        )
        return [Reply(texts.REVIEW_QUEUED.format(number=ticket.number), remove_keyboard=True)]
    co = [u for u in tri.get("co_units") or [] if u in units[1:]]
    dispatch(s, ticket, SYSTEM, lead=units[0], co=co)
    for tu in ticket.units:
        notify_unit(
            s,
            tu.unit_code,
            unit_card(s, ticket, tu.unit_code, photos=len(d.get("photos", []))),
            ticket_id=ticket.id,
            kind="card",
            dedupe_key=f"card:{ticket.id}:{ticket.return_count}",
        )
    lead = s.get(Unit, units[0])
    repeat_note = (
        f"\n（系统提示：与您此前的工单 {old.number} 内容相近，已标注为重复诉求并提示承办单位。）"
        if old
        else ""
    )
    return [
        Reply(
            f"✅ 已受理，工单号 {ticket.number}\n承办单位：{lead.name if lead else units[0]}\n"
            f"办理时限：{ticket.finish_due:%Y-%m-%d %H:%M} 前答复\n"
            f"可随时发送 /status {ticket.number} 查询进度。{repeat_note}",
            remove_keyboard=True,
            buttons=[
                [Button("追加信息", f"add:{ticket.number}"), Button("查看进度", f"show:{ticket.number}")]
            ],
        )
    ]


# --------------------------------------------------------------------------- follow-up


def _own_ticket(ctx: Ctx, number: str) -> Ticket | None:
    try:
        t = get_ticket(ctx.session, number)
    except WorkflowError:
        return None
    return t if t.citizen_id == ctx.citizen.id else None


def _followed_ticket(ctx: Ctx, number: str) -> Ticket | None:
    """A ticket the citizen filed or joined (followers may look at progress, not rate or add to it)."""
    t = _own_ticket(ctx, number)
    if t is not None:
        return t
    try:
        t = get_ticket(ctx.session, number)
    except WorkflowError:
        return None
    return t if ctx.citizen.id in followers(ctx.session, t) else None


def _status(ctx: Ctx, number: str) -> list[Reply]:
    number = number.strip()
    t = _followed_ticket(ctx, number)
    if t is None:
        return [Reply(texts.NOT_FOUND_OR_NOT_YOURS.format(number=number[:30]))]
    lines = [
        f"工单 {t.number}（{TYPE_ZH.get(t.type or '', '诉求')}）",
        f"当前：{STATUS_ZH.get(t.status, t.status)}",
    ]
    if t.lead_unit:
        lines.append(f"承办单位：{'、'.join(_unit_names(ctx.session, [t.lead_unit]))}")
    if t.finish_due and t.status not in ("archived", "replied"):
        lines.append(f"办理时限：{t.finish_due:%Y-%m-%d %H:%M}")
    lines.append("进展：")
    for ev in history(ctx.session, t):
        label = _EVENT_ZH.get(ev.action)
        if label:
            lines.append(f"  {ev.at:%m-%d %H:%M} {label}")
    buttons = [[Button("追加信息", f"add:{t.number}")]] if t.status not in ("archived", "rejected") else []
    return [Reply("\n".join(lines), buttons=buttons)]


_EVENT_ZH = {
    "receive": "收到诉求",
    "triage": "完成分类",
    "dispatch": "已转办承办单位",
    "sign": "承办单位已签收",
    "return_approved": "重新指派承办单位",
    "extension_approved": "已批准延期",
    "submit_reply": "承办单位提交答复",
    "reply_approved": "已答复",
    "rate": "已评价",
    "add_info": "您补充了信息",
    "answer": "知识库已答复",
    "supervise": "热线中心督办",
    "survey_expired": "回访期满归档",
}


def _my_tickets(ctx: Ctx) -> list[Reply]:
    rows = ctx.session.scalars(
        select(Ticket)
        .where(Ticket.citizen_id == ctx.citizen.id, Ticket.status.notin_(("rejected", "redirected")))
        .order_by(Ticket.id.desc())
        .limit(10)
    ).all()
    if not rows:
        return [Reply(texts.NO_TICKETS)]
    lines = ["您最近的诉求："]
    buttons = []
    for t in rows:
        lines.append(f"· {t.number} {STATUS_ZH.get(t.status, t.status)}：{t.original_text[:24]}")
        buttons.append([Button(f"查看 {t.number}", f"show:{t.number}")])
    return [Reply("\n".join(lines), buttons=buttons[:5])]


def _start_add_info(ctx: Ctx, number: str) -> list[Reply]:
    t = _own_ticket(ctx, number)
    if t is None:
        return [Reply(texts.NOT_FOUND_OR_NOT_YOURS.format(number=number))]
    if t.status in ("archived", "rejected", "redirected", "answered"):
        return [
            Reply(f"工单 {number} 已{STATUS_ZH.get(t.status, '办结')}，不能再追加。如有新问题请直接输入。")
        ]
    ctx.st.start("add_info", number=number)
    return [Reply(texts.ASK_ADD_INFO.format(number=number))]


def _finish_add_info(ctx: Ctx, text: str) -> list[Reply]:
    number = ctx.st.data.get("number", "")
    t = _own_ticket(ctx, number)
    ctx.st.reset()
    if t is None:
        return [Reply(texts.NOT_FOUND_OR_NOT_YOURS.format(number=number))]
    try:
        add_info(ctx.session, t, ctx.actor, text=text)
    except WorkflowError as err:
        return [Reply(str(err))]
    if t.lead_unit:
        notify_unit(
            ctx.session,
            t.lead_unit,
            Reply(f"工单 {t.number} 诉求人补充信息：\n{mask_text(text)[:1000]}"),
            ticket_id=t.id,
            kind="add_info",
        )
    return [Reply(texts.ADD_INFO_DONE.format(number=number))]


def survey_message(ticket: Ticket, reply_text: str, unit_name: str) -> Reply:
    """The approved reply and the revisit survey, as the citizen receives them."""
    return Reply(
        f"工单 {ticket.number} 已有答复：\n{reply_text}\n—— {unit_name}\n\n请对本次办理进行评价：",
        buttons=[
            [
                Button("满意", f"rate:{ticket.number}:satisfied"),
                Button("基本满意", f"rate:{ticket.number}:basic"),
                Button("不满意", f"rate:{ticket.number}:unsatisfied"),
            ]
        ],
    )


def _rate(ctx: Ctx, number: str, value: str) -> list[Reply]:
    t = _own_ticket(ctx, number)
    if t is None:
        return [Reply(texts.NOT_FOUND_OR_NOT_YOURS.format(number=number))]
    if t.status != "replied":
        return [Reply(f"工单 {number} 当前不在回访评价阶段，这个按钮已过期。")]
    if value == "unsatisfied":
        ctx.st.start("unsatisfied_reason", number=number)
        redo = policy_of(t).redo
        redo_left = t.redo_count < redo.max_count or redo.second_unsatisfied != "archive"
        return [Reply(texts.ASK_UNSATISFIED if redo_left else texts.ASK_UNSATISFIED_NO_REDO)]
    if value not in ("satisfied", "basic"):
        return [Reply(texts.STALE_BUTTON)]
    rate(ctx.session, t, ctx.actor, value=value)
    notify_rating(ctx.session, t)
    return [Reply(texts.THANKS_RATING.format(number=number))]


def _finish_unsatisfied(ctx: Ctx, text: str) -> list[Reply]:
    number = ctx.st.data.get("number", "")
    ctx.st.reset()
    t = _own_ticket(ctx, number)
    if t is None or t.status != "replied":
        return [Reply(f"工单 {number} 当前不在回访评价阶段。")]
    outcome = rate(ctx.session, t, ctx.actor, value="unsatisfied", comment=text)
    notify_rating(ctx.session, t)
    if outcome == "redo":
        if t.lead_unit:
            notify_unit(
                ctx.session,
                t.lead_unit,
                unit_view(ctx.session, t, t.lead_unit, headline="诉求人不满意，请重新办理"),
                ticket_id=t.id,
                kind="card",
                dedupe_key=f"redo:{t.id}:{t.redo_count}",
            )
        return [Reply(texts.RATING_REDO.format(number=number, due=f"{t.finish_due:%Y-%m-%d %H:%M}"))]
    if outcome == "archive":  # the policy has no (further) redo: recorded for the unit's assessment
        return [Reply(texts.RATING_ARCHIVED.format(number=number))]
    notify_unit(
        ctx.session,
        CENTER,
        Reply(f"工单 {t.number} {'再次' if t.redo_count else ''}不满意，需人工回访：{mask_text(text)[:500]}"),
        ticket_id=t.id,
        kind="center_queue",
        dedupe_key=f"manual:{t.id}",
    )
    return [Reply(texts.RATING_FINAL.format(number=number))]
