"""Earlier tickets about the same event: repeat complaints (重复投诉) and "join the existing ticket".

:func:`find_similar` ranks the tickets created within ``window_days`` before ``now`` by

    score = 0.7 · wording + 0.2 · same place + 0.1 · same citizen

where ``wording`` is the text similarity rescaled to 0..1 — the cosine of the two e5 embeddings when both are
known (the new message's, which the pipeline already computes, and the stored ``ticket_embeddings`` row of the
candidate), else the overlap of their jieba content words — and ``same place`` compares the location strings
(``ticket.ev_place``, or the place :func:`triage.elements.extract_elements` finds in the text). A candidate is
returned when ``score >= min_score`` (0.5): the same place and the same citizen alone (0.3) never make a
different event at the same address "similar"; similar wording does, and even more with the same place.

Two uses (see the module's callers' notes in the integration report):

* the repeat-complaint rule ``models.workflow.find_repeat`` needs the same citizen's earlier tickets about the
  same issue: :func:`same_issue` plugs into its ``same_issue`` argument today, and :func:`repeat_candidates` is the
  candidate search it can use instead of its own query;
* :func:`join_candidates` finds an OPEN ticket from another citizen about the same public event at the same place
  (the same broken streetlight), so the bot can offer to add this citizen as a follower
  (:func:`add_follower`) instead of opening a duplicate ticket.

Ticket embeddings are stored with :func:`store_embedding` (table ``ticket_embeddings``, migration 0002).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache

import numpy as np
from sqlalchemy import Select, bindparam, case, func, null, or_, select
from sqlalchemy.orm import Session

from models.states import OPEN_STATES
from models.tables import Ticket, TicketEmbedding, TicketFollower

W_TEXT, W_PLACE, W_CITIZEN = 0.7, 0.2, 0.1
MIN_SCORE = 0.5
SIMILAR_WORDING = 0.5  # rescaled text similarity from which the wording alone is a reason
# e5-small cosine and word-overlap ranges mapped to 0..1 (below the floor: unrelated; above the top: the same
# report). Set on ~15 hand-written pairs: the same event reworded scored cosine 0.948-0.999 and word overlap
# 0.13-0.58 (mostly 0.17-0.33); a different event at the same place cosine 0.90-0.93 and overlap 0-0.18. The word
# overlap separates them poorly (it is the fallback when no embedding is stored); the embedding does better.
EMB_FLOOR, EMB_TOP = 0.91, 0.97
LEX_FLOOR, LEX_TOP = 0.05, 0.30
SCAN_LIMIT = 500  # most recent tickets of the window examined
EXCLUDED_STATUSES = ("rejected", "redirected")

REASON_ZH = {"same_citizen": "同一市民", "same_place": "同一地点", "similar_wording": "表述相似"}


@dataclass
class SimilarTicket:
    ticket: Ticket
    score: float
    wording: float  # rescaled text similarity, 0..1
    method: str  # "embedding" | "words"
    same_citizen: bool
    same_place: bool
    reasons: list[str] = field(default_factory=list)  # keys of REASON_ZH, strongest first

    @property
    def reason_zh(self) -> str:
        return "、".join(REASON_ZH[r] for r in self.reasons)


# ------------------------------------------------------------------------------------- text


_STOP = frozenset(
    "我 你 他 她 它 我们 你们 他们 的 了 是 在 有 和 与 也 就 都 还 又 很 太 把 被 让 给 对 从 到 这 那 这个 那个 一个 "
    "什么 怎么 为什么 吗 呢 吧 啊 呀 哦 嘛 没 没有 不 一直 已经 现在 今天 昨天 非常 特别 希望 请 麻烦 谢谢 反映 问题 "
    "情况 一下 能不能 可以 是否 我家 我们家 这里 那里 附近 相关 部门 有关 处理 解决 尽快 帮忙 看看".split()
)
_KEEP_SINGLE = re.compile(r"[灯路桥树井坑水电气门窗墙楼车狗猫油烟火]")


def content_words(text: str) -> frozenset[str]:
    """jieba words of ``text`` without function words; single characters only when they name a thing."""
    from triage.tokenizer import tokens

    return frozenset(
        w for w in tokens(text or "") if w not in _STOP and (len(w) > 1 or _KEEP_SINGLE.fullmatch(w))
    )


_STOP_CHARS = frozenset("的了是在有和也就都还又很太把被让给对从到这那个不没我你他她们吗呢吧啊呀")


def _features(text: str, place: str) -> frozenset[str]:
    """Content words plus their characters (so "路灯" meets "灯不亮"), minus the words of the place, which
    :func:`find_similar` scores on its own."""
    words = {w for w in content_words(text) if not (place and w in place)}
    chars = {
        c for w in words for c in w if "\u4e00" <= c <= "\u9fff" and c not in _STOP_CHARS and c not in place
    }
    return frozenset(words | chars)


def word_overlap(a: str, b: str, place_a: str | None = None, place_b: str | None = None) -> float:
    """Jaccard overlap (0..1) of the jieba content words and their characters, place words left out; the
    embedding-free similarity. ``place_a``/``place_b``: normalised places (None: found in the texts)."""
    x = _features(a, place_of(a, None) if place_a is None else place_a)
    y = _features(b, place_of(b, None) if place_b is None else place_b)
    return len(x & y) / len(x | y) if x and y else 0.0


def _rescale(value: float, floor: float, top: float) -> float:
    return float(min(1.0, max(0.0, (value - floor) / (top - floor))))


def wording_similarity(
    a: str,
    b: str,
    emb_a: np.ndarray | None = None,
    emb_b: np.ndarray | None = None,
    place_a: str | None = None,
    place_b: str | None = None,
) -> tuple[float, str]:
    """(0..1 similarity, method): the embeddings' cosine when both are given, else the word overlap."""
    if emb_a is not None and emb_b is not None and emb_a.shape == emb_b.shape:
        cos = float(np.dot(emb_a, emb_b) / ((np.linalg.norm(emb_a) * np.linalg.norm(emb_b)) or 1.0))
        return _rescale(cos, EMB_FLOOR, EMB_TOP), "embedding"
    return _rescale(word_overlap(a, b, place_a, place_b), LEX_FLOOR, LEX_TOP), "words"


def same_issue(a: str, b: str) -> bool:
    """Embedding-free "same issue" test with the signature ``models.workflow.find_repeat`` expects."""
    return wording_similarity(a, b)[0] >= SIMILAR_WORDING


# ------------------------------------------------------------------------------------- place

_PLACE_NOISE = re.compile(r"[\s,，。、;；:：()（）\-—·]|附近|旁边|对面|门口|这边|那边|一带|周边|路口处")
_DIGITS = re.compile(r"\d+|[一二三四五六七八九十百]+(?=[号栋幢单元楼层排组])")


@lru_cache(maxsize=8192)
def _norm_place(place: str | None) -> str:
    return _PLACE_NOISE.sub("", (place or "").lower())


@lru_cache(maxsize=8192)
def place_of(text: str, place: str | None) -> str:
    """The location string of a ticket or message: the given one, else the place found in the text.
    Cached: every search compares the new message with the same few hundred recent tickets."""
    if place and place.strip():
        return _norm_place(place)
    from triage.elements import extract_elements

    return _norm_place(extract_elements(text or "").place)


@lru_cache(maxsize=65536)
def same_place(a: str, b: str) -> bool:
    """Two normalised location strings name the same place: one contains the other, or they share most of their
    character pairs — and any house/building numbers they both carry agree ("3号楼" is not "5号楼")."""
    if len(a) < 2 or len(b) < 2:
        return False
    da, db = set(_DIGITS.findall(a)), set(_DIGITS.findall(b))
    if da and db and da != db:
        return False
    if a in b or b in a:
        return True
    ga = {a[i : i + 2] for i in range(len(a) - 1)}
    gb = {b[i : i + 2] for i in range(len(b) - 1)}
    return len(ga & gb) / min(len(ga), len(gb)) >= 0.6


def _named_in(place: str, text: str | None) -> bool:
    """A place of at least three characters (建设路, 幸福里小区) that the other message names verbatim."""
    return len(place) >= 3 and place in _norm_place(text)


def _like_any_naming(place: str) -> str:
    """A LIKE pattern (escape ``\\``) that every text naming ``place`` in the sense of :func:`_named_in` matches:
    the place's characters in order with anything between them (normalising drops noise from the text), a cased
    character or a combining mark left out (lower-casing may have changed or made it). It matches more texts
    than that; :func:`_named_in` decides."""
    chars = (c for c in place if c.lower() == c.upper() and not unicodedata.combining(c))
    return "%" + "%".join(c.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") for c in chars) + "%"


# ------------------------------------------------------------------------------------- storage


def _vector(vector: bytes, dim: int) -> np.ndarray:
    return np.frombuffer(vector, dtype=np.float32, count=dim)


def store_embedding(
    session: Session, ticket: Ticket, embedding: np.ndarray, model: str = "e5-small", *, new_ticket: bool = False
) -> None:
    """Keep the ticket's embedding (the one triage computed) for later similarity searches; replaces any older.
    ``new_ticket``: the ticket was created in this transaction, so it has no stored vector to look up (issue 8:
    the look-up and its autoflush cost 3% of the bot's CPU under load). The row is written by the session's next
    flush."""
    vec = np.asarray(embedding, dtype=np.float32).reshape(-1)
    row = None if new_ticket else session.get(TicketEmbedding, ticket.id)
    if row is None:
        row = TicketEmbedding(ticket_id=ticket.id)
        session.add(row)
    row.model, row.dim, row.vector = model, int(vec.shape[0]), vec.tobytes()


def ticket_embeddings(
    session: Session, ids: Iterable[int], model: str | None = None
) -> dict[int, np.ndarray]:
    ids = list(ids)
    if not ids:
        return {}
    query = select(TicketEmbedding.ticket_id, TicketEmbedding.vector, TicketEmbedding.dim).where(
        TicketEmbedding.ticket_id.in_(ids)
    )
    if model is not None:
        query = query.where(TicketEmbedding.model == model)
    return {tid: _vector(vector, dim) for tid, vector, dim in session.execute(query)}


# ------------------------------------------------------------------------------------- search


def find_similar(
    session: Session,
    text: str,
    embedding: np.ndarray | None,
    citizen_id: int | None,
    location: str | None,
    now: datetime,
    window_days: int = 30,
    limit: int = 5,
    *,
    exclude_ticket_id: int | None = None,
    open_only: bool = False,
    citizen_only: bool = False,
    min_score: float = MIN_SCORE,
    model: str | None = None,
    same_place_only: bool = False,
    others_only: bool = False,
    similar_wording_only: bool = False,
) -> list[SimilarTicket]:
    """Earlier tickets about the same event as ``text``, best first (at most ``limit``).

    ``embedding``: the message's e5 vector ("query: " prefix, as the pipeline computes it) or None — pairs whose
    candidate has no stored embedding (or when None is given) fall back to jieba word overlap.
    ``location``: the place the citizen gave (None: the place found in the text). Only tickets created in
    ``[now - window_days, now]`` and not rejected/redirected are examined; ``open_only`` keeps open tickets,
    ``citizen_only`` the citizen's own. ``model``: only compare stored vectors of this encoder.
    ``same_place_only``: skip candidates at another place before any wording is compared (the cheap test
    first: "join the existing ticket" needs the same place anyway). ``others_only``: skip the citizen's own
    tickets; ``similar_wording_only``: keep only candidates whose wording alone is similar.
    """
    since = now - timedelta(days=window_days)
    here = place_of(text, location)
    if same_place_only:
        return _rank_same_place(
            session, text, embedding, citizen_id, here, since, now, limit,
            exclude_ticket_id=exclude_ticket_id, open_only=open_only, citizen_only=citizen_only, model=model,
            others_only=others_only, similar_wording_only=similar_wording_only, min_score=min_score,
        )
    if citizen_only and citizen_id is None:
        return []
    # plain columns, not Ticket objects: a search reads a few hundred rows and keeps at most ``limit``
    query = _window(
        select(Ticket.id, Ticket.original_text, Ticket.ev_place, Ticket.citizen_id),
        exclude_ticket_id is not None, open_only, citizen_only,
    )
    params = {"since": since, "now": now, "exclude": exclude_ticket_id, "citizen": citizen_id}
    rows = session.execute(query, params).all()
    if not rows:
        return []
    near = _near_test(here, text)
    places = {}
    for tid, original, ev_place, _ in rows:
        there = place_of(original, ev_place)
        places[tid] = (there, near(there, original))
    emb = None if embedding is None else np.asarray(embedding, dtype=np.float32).reshape(-1)
    stored = ticket_embeddings(session, [r[0] for r in rows], model) if emb is not None else {}
    candidates = [(tid, original, owner, stored.get(tid), *places[tid]) for tid, original, _, owner in rows]
    return _ranked(
        session, text, emb, citizen_id, here, candidates, limit, min_score, others_only, similar_wording_only
    )


def _near_test(here: str, text: str) -> Callable[[str, str | None], bool]:
    """Whether a ticket at place ``there`` with text ``original`` is at the place ``here`` of the message
    ``text``: the same place, or either place named in the other's text (the extracted place is one road of
    several a message names). A text of None is one known not to name ``here``. The few hundred tickets of a
    search name a few dozen places: each place is compared once."""
    by_place: dict[str, bool] = {}

    def near(there: str, original: str | None) -> bool:
        same = by_place.get(there)
        if same is None:
            same = by_place[there] = same_place(here, there) or _named_in(there, text)
        return same or (original is not None and _named_in(here, original))

    return near


# issue 8: the statements of a search are built once (with bound parameters), so that a search does not spend
# its time constructing SQL expressions and their cache keys anew (that cost more than reading the rows)
_TEXTS = select(Ticket.id, Ticket.original_text).where(Ticket.id.in_(bindparam("ids", expanding=True)))
_TICKETS = select(Ticket).where(Ticket.id.in_(bindparam("ids", expanding=True)))


def _window(query: Select, exclude: bool, open_only: bool, citizen_only: bool) -> Select:
    """``query`` kept to the tickets a search examines, most recent first: created in ``[:since, :now]``, not
    rejected or redirected, not ``:exclude`` (``exclude``), open (``open_only``), of ``:citizen``
    (``citizen_only``)."""
    query = query.where(
        Ticket.created_at >= bindparam("since"),
        Ticket.created_at <= bindparam("now"),
        Ticket.status.notin_(EXCLUDED_STATUSES),
    )
    if exclude:
        query = query.where(Ticket.id != bindparam("exclude"))
    if open_only:
        query = query.where(Ticket.status.in_(sorted(OPEN_STATES)))
    if citizen_only:
        query = query.where(Ticket.citizen_id == bindparam("citizen"))
    return query.order_by(Ticket.created_at.desc()).limit(SCAN_LIMIT)


@lru_cache(maxsize=32)
def _same_place_scan(
    named: bool, exclude: bool, open_only: bool, citizen_only: bool, others: bool, all_texts: bool
) -> Select:
    """The scan of :func:`_rank_same_place`: each ticket's id, stored place and owner, and its text where the
    place must be found in the text (none stored) or the text may name the searched place (a LIKE superset of
    :func:`_named_in`, pattern ``:pattern``); every text with ``all_texts``."""
    needs_text = or_(Ticket.ev_place.is_(None), func.trim(Ticket.ev_place) == "")
    if named:
        needs_text = or_(needs_text, Ticket.original_text.like(bindparam("pattern"), escape="\\"))
    text_column = Ticket.original_text if all_texts else case((needs_text, Ticket.original_text), else_=null())
    query = select(Ticket.id, Ticket.ev_place, text_column, Ticket.citizen_id)
    if others:  # the citizen's own tickets take no place in the scan
        query = query.where(or_(Ticket.citizen_id.is_(None), Ticket.citizen_id != bindparam("citizen")))
    return _window(query, exclude, open_only, citizen_only)


@lru_cache(maxsize=2)
def _near_tickets(by_model: bool) -> Select:
    """Text, owner and stored vector (of the model ``:model`` when ``by_model``) of the tickets ``:ids``."""
    on = TicketEmbedding.ticket_id == Ticket.id
    if by_model:
        on = on & (TicketEmbedding.model == bindparam("model"))
    return (
        select(Ticket.id, Ticket.original_text, Ticket.citizen_id, TicketEmbedding.vector, TicketEmbedding.dim)
        .outerjoin(TicketEmbedding, on)
        .where(Ticket.id.in_(bindparam("ids", expanding=True)))
    )


def _rank_same_place(
    session: Session,
    text: str,
    embedding: np.ndarray | None,
    citizen_id: int | None,
    here: str,
    since: datetime,
    now: datetime,
    limit: int,
    *,
    exclude_ticket_id: int | None,
    open_only: bool,
    citizen_only: bool,
    model: str | None,
    others_only: bool,
    similar_wording_only: bool,
    min_score: float,
) -> list[SimilarTicket]:
    """:func:`find_similar` for candidates at the same place only (the "join this ticket" offer), with the
    same result, reading less (issue 8: the scan of the 500 most recent open tickets, each with its text, was
    the biggest single cost of a bot under load, 15 % of its samples holding the GIL in a profile). The scan
    reads each ticket's stored place and its text only where the place must be found in the text or the text
    may name this place; the texts and vectors of the few tickets at this place come with one more statement.
    Without the message's vector the wording is compared word by word: the scan then reads every text, and
    nothing more is read."""
    if citizen_only and citizen_id is None:
        return []
    named = len(here) >= 3  # :func:`_named_in` needs that many characters
    others = others_only and citizen_id is not None
    emb = None if embedding is None else np.asarray(embedding, dtype=np.float32).reshape(-1)
    query = _same_place_scan(named, exclude_ticket_id is not None, open_only, citizen_only, others, emb is None)
    params = {"since": since, "now": now, "exclude": exclude_ticket_id, "citizen": citizen_id}
    if named:
        params["pattern"] = _like_any_naming(here)
    rows = session.execute(query, params).all()
    near = _near_test(here, text)
    at_place: dict[int, tuple[str, str | None, int | None]] = {}  # id: place, text (if read), owner
    unread: dict[int, int | None] = {}  # id: owner; a blank place SQL's trim() did not see (a tab): read the text
    for tid, ev_place, original, owner in rows:
        if ev_place and ev_place.strip():
            there = _norm_place(ev_place)
        elif original is not None:
            there = place_of(original, None)
        else:
            unread[tid] = owner
            continue
        if near(there, original):
            at_place[tid] = (there, original, owner)
    if unread:
        for tid, original in session.execute(_TEXTS, {"ids": list(unread)}):
            there = place_of(original, None)
            if near(there, original):
                at_place[tid] = (there, original, unread[tid])
    if not at_place:
        return []
    if emb is None:  # every text is read now: the wording is compared word by word
        found = [(tid, original, owner, None, None) for tid, (_, original, owner) in at_place.items()]
    else:
        found = session.execute(_near_tickets(model is not None), {"ids": list(at_place), "model": model}).all()
    candidates = [
        (tid, original, owner, _vector(vector, dim) if emb is not None and vector is not None else None,
         at_place[tid][0], True)
        for tid, original, owner, vector, dim in found
    ]
    return _ranked(
        session, text, emb, citizen_id, here, candidates, limit, min_score, others_only, similar_wording_only
    )


def _ranked(
    session: Session,
    text: str,
    emb: np.ndarray | None,
    citizen_id: int | None,
    here: str,
    candidates: list[tuple[int, str, int | None, np.ndarray | None, str, bool]],
    limit: int,
    min_score: float,
    others_only: bool,
    similar_wording_only: bool,
) -> list[SimilarTicket]:
    """Score ``candidates`` (id, text, owner, stored vector, place, same place), best first."""
    scored: list[tuple[float, int, float, str, bool, bool, list[str]]] = []
    for tid, original, owner, vector, there, place in candidates:
        wording, method = wording_similarity(text, original, emb, vector, here, there)
        citizen = citizen_id is not None and owner == citizen_id
        score = W_TEXT * wording + W_PLACE * place + W_CITIZEN * citizen
        if score < min_score or (others_only and citizen) or (similar_wording_only and wording < SIMILAR_WORDING):
            continue
        reasons = [
            r
            for r, ok in (
                ("similar_wording", wording >= SIMILAR_WORDING),
                ("same_place", place),
                ("same_citizen", citizen),
            )
            if ok
        ]
        scored.append((round(score, 4), tid, round(wording, 4), method, citizen, place, reasons))
    scored.sort(key=lambda c: (-c[0], -c[1]))
    scored = scored[:limit]
    if not scored:
        return []
    tickets = {t.id: t for t in session.scalars(_TICKETS, {"ids": [c[1] for c in scored]})}
    return [
        SimilarTicket(tickets[tid], score, wording, method, citizen, place, reasons)
        for score, tid, wording, method, citizen, place, reasons in scored
        if tid in tickets
    ]


def repeat_candidates(
    session: Session,
    ticket: Ticket,
    embedding: np.ndarray | None = None,
    *,
    window_days: int = 60,
    limit: int = 5,
    model: str | None = None,
) -> list[SimilarTicket]:
    """The same citizen's earlier tickets about the same issue as ``ticket`` (candidates for the repeat rule,
    whose time conditions ``find_repeat`` still applies); ``embedding`` defaults to the stored one."""
    if embedding is None:
        embedding = ticket_embeddings(session, [ticket.id], model).get(ticket.id)
    return find_similar(
        session,
        ticket.original_text,
        embedding,
        ticket.citizen_id,
        ticket.ev_place,
        ticket.created_at,
        window_days,
        limit,
        exclude_ticket_id=ticket.id,
        citizen_only=True,
        model=model,
    )


def join_candidates(
    session: Session,
    text: str,
    embedding: np.ndarray | None,
    citizen_id: int | None,
    location: str | None,
    now: datetime,
    window_days: int = 30,
    limit: int = 3,
    *,
    model: str | None = None,
) -> list[SimilarTicket]:
    """Open tickets from OTHER citizens about the same public event at the same place (similar wording AND same
    place): the bot may offer "join this ticket" instead of opening a duplicate."""
    return find_similar(
        session,
        text,
        embedding,
        citizen_id,
        location,
        now,
        window_days,
        limit=limit,
        open_only=True,
        model=model,
        same_place_only=True,
        others_only=True,
        similar_wording_only=True,
    )


def add_follower(
    session: Session, ticket: Ticket, citizen_id: int, text: str | None = None
) -> TicketFollower:
    """Record that ``citizen_id`` joined ``ticket`` (idempotent: joining twice keeps one row)."""
    row = session.scalar(
        select(TicketFollower).where(
            TicketFollower.ticket_id == ticket.id, TicketFollower.citizen_id == citizen_id
        )
    )
    if row is None:
        row = TicketFollower(ticket_id=ticket.id, citizen_id=citizen_id, text=text)
        session.add(row)
        session.flush()
    return row


def followers(session: Session, ticket: Ticket) -> list[int]:
    """Citizen ids following ``ticket`` (to tell them the outcome along with the reporter)."""
    return list(
        session.scalars(
            select(TicketFollower.citizen_id)
            .where(TicketFollower.ticket_id == ticket.id)
            .order_by(TicketFollower.id)
        )
    )
