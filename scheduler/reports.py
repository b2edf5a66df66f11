"""Weekly and monthly reports (宿政办发〔2020〕55号 第十三条: 月报、周报、快报) from the tickets' own data.

Per handling unit (the lead unit of each ticket):

* 按期办结率 on-time rate = replies approved in the period that were never overdue, over those replies plus
  the tickets whose finish deadline passed in the period and that are still in the unit's hands;
* 满意率 satisfaction rate = (满意 + 基本满意) over rated (满意, 基本满意, 不满意) in the period; "no rating"
  (未评价) is counted apart and never in the rate, and an "unsatisfied" overturned by an upheld appeal (甄别)
  does not count;
* returns and extensions the unit asked for, redos, knowledge-base upkeep (entries changed in the period,
  entries that need review: kb.store.stale_report), yellow and red cards issued (Notice rows), repeat
  complaints (Ticket.repeat_of_id).

Hotspots: the period's requests clustered by jieba TF-IDF cosine similarity (greedy, in arrival order,
deterministic), with counts and the member nearest each cluster's centre as its representative message
(masked). No embedding model is loaded here.
"""

from __future__ import annotations

import csv
import logging
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import lru_cache
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bot.messages import Reply
from bot.outbox import chats_of_unit, enqueue
from models.catalog import CENTER
from models.clock import CHINA_TZ
from models.knowledge import KBEntry, KBEntryVersion
from models.privacy import mask_text
from models.tables import Notice, Rating, Ticket, TicketEvent, TicketRequest, Unit

log = logging.getLogger(__name__)

HOTSPOT_THRESHOLD = 0.3  # cosine similarity to a cluster's centre to join it
HOTSPOT_MIN_COUNT = 2
HOTSPOT_TOP = 5
CHASE_STATES = ("dispatched", "signed", "redo", "extension_requested")
PERIOD_ZH = {"week": "周报", "month": "月报"}
_STOP = frozenset(
    "的 了 是 在 我 我们 有 和 也 就 都 很 还 请 您 你 吧 呢 啊 吗 这 那 一个 什么 没有 已经 现在 问题 反映".split()
)


@dataclass
class UnitStats:
    unit: str
    name: str
    dispatched: int = 0  # tickets dispatched to the unit as lead in the period
    finished: int = 0  # replies approved in the period
    on_time: int = 0  # of those, never overdue
    overdue_unfinished: int = 0  # finish deadline passed in the period, still not replied
    satisfied: int = 0  # 满意 + 基本满意
    unsatisfied: int = 0
    no_rating: int = 0
    returns: int = 0
    extensions: int = 0
    redos: int = 0
    kb_updated: int = 0
    kb_stale: int = 0
    yellow: int = 0
    red: int = 0
    repeats: int = 0

    @property
    def rated(self) -> int:
        return self.satisfied + self.unsatisfied

    @property
    def on_time_rate(self) -> float | None:
        due = self.finished + self.overdue_unfinished
        return self.on_time / due if due else None

    @property
    def satisfaction_rate(self) -> float | None:
        return self.satisfied / self.rated if self.rated else None

    def active(self) -> bool:
        return any(
            getattr(self, f)
            for f in (
                "dispatched",
                "finished",
                "overdue_unfinished",
                "satisfied",
                "unsatisfied",
                "no_rating",
                "returns",
                "extensions",
                "redos",
                "kb_updated",
                "kb_stale",
                "yellow",
                "red",
                "repeats",
            )
        )


@dataclass
class Hotspot:
    count: int
    text: str  # the representative message, masked
    units: list[str]  # most frequent lead units of the cluster
    numbers: list[str]  # a few ticket numbers


@dataclass
class RepeatItem:
    number: str
    of_number: str
    unit: str | None


@dataclass
class Report:
    period: str  # week | month
    start: datetime
    end: datetime  # exclusive
    received: int = 0
    units: list[UnitStats] = field(default_factory=list)
    hotspots: list[Hotspot] = field(default_factory=list)
    repeats: list[RepeatItem] = field(default_factory=list)

    def unit(self, code: str) -> UnitStats:
        for u in self.units:
            if u.unit == code:
                return u
        raise KeyError(code)

    def totals(self) -> UnitStats:
        total = UnitStats("all", "全部")
        for u in self.units:
            for f in UnitStats.__dataclass_fields__:
                if f not in ("unit", "name"):
                    setattr(total, f, getattr(total, f) + getattr(u, f))
        return total

    @property
    def title(self) -> str:
        last = self.end - timedelta(days=1)
        return f"12345热线{PERIOD_ZH.get(self.period, '报告')}（{self.start:%Y-%m-%d} 至 {last:%Y-%m-%d}）"


# --------------------------------------------------------------------------- period


def period_bounds(period: str, today: date) -> tuple[datetime, datetime]:
    """The last complete week (Monday–Sunday) or calendar month before ``today``: [start, end) in China time."""
    if period == "week":
        monday = today - timedelta(days=today.weekday())
        start_day, end_day = monday - timedelta(days=7), monday
    elif period == "month":
        end_day = today.replace(day=1)
        start_day = (end_day - timedelta(days=1)).replace(day=1)
    else:
        raise ValueError(f"unknown period {period!r}: use week or month")
    return (
        datetime.combine(start_day, datetime.min.time(), tzinfo=CHINA_TZ),
        datetime.combine(end_day, datetime.min.time(), tzinfo=CHINA_TZ),
    )


# --------------------------------------------------------------------------- building the report


def weekly_report(session: Session, start: datetime, end: datetime, *, period: str = "week") -> Report:
    """Every number of the report for [start, end)."""
    report = Report(period=period, start=start, end=end)
    stats: dict[str, UnitStats] = {}

    def unit(code: str | None) -> UnitStats | None:
        if not code or code == CENTER:
            return None
        if code not in stats:
            u = session.get(Unit, code)
            stats[code] = UnitStats(code, u.name if u else code)
        return stats[code]

    def within(col):
        return (col >= start) & (col < end)

    report.received = int(session.scalar(select(func.count(Ticket.id)).where(within(Ticket.created_at))) or 0)

    for code, n in session.execute(
        select(Ticket.lead_unit, func.count(Ticket.id))
        .where(within(Ticket.dispatched_at))
        .group_by(Ticket.lead_unit)
    ):
        if u := unit(code):
            u.dispatched += n
    for code, overdue, n in session.execute(
        select(Ticket.lead_unit, Ticket.overdue, func.count(Ticket.id))
        .where(within(Ticket.replied_at))
        .group_by(Ticket.lead_unit, Ticket.overdue)
    ):
        if u := unit(code):
            u.finished += n
            u.on_time += 0 if overdue else n
    for code, n in session.execute(
        select(Ticket.lead_unit, func.count(Ticket.id))
        .where(Ticket.status.in_(CHASE_STATES), within(Ticket.finish_due))
        .group_by(Ticket.lead_unit)
    ):
        if u := unit(code):
            u.overdue_unfinished += n

    for code, value, appeal, n in session.execute(
        select(Ticket.lead_unit, Rating.value, Rating.appeal, func.count(Rating.id))
        .join(Ticket, Ticket.id == Rating.ticket_id)
        .where(within(Rating.rated_at))
        .group_by(Ticket.lead_unit, Rating.value, Rating.appeal)
    ):
        if not (u := unit(code)):
            continue
        if value in ("satisfied", "basic"):
            u.satisfied += n
        elif value == "unsatisfied" and appeal != "upheld":
            u.unsatisfied += n
        elif value == "none":
            u.no_rating += n

    for code, kind, n in session.execute(
        select(TicketRequest.unit_code, TicketRequest.kind, func.count(TicketRequest.id))
        .where(within(TicketRequest.requested_at), TicketRequest.kind.in_(("return", "extension")))
        .group_by(TicketRequest.unit_code, TicketRequest.kind)
    ):
        if u := unit(code):
            if kind == "return":
                u.returns += n
            else:
                u.extensions += n

    for code, n in session.execute(
        select(Ticket.lead_unit, func.count(TicketEvent.id))
        .join(Ticket, Ticket.id == TicketEvent.ticket_id)
        .where(within(TicketEvent.at), TicketEvent.action == "rate", TicketEvent.to_status == "redo")
        .group_by(Ticket.lead_unit)
    ):
        if u := unit(code):
            u.redos += n

    for code, kind, n in session.execute(
        select(Notice.unit_code, Notice.kind, func.count(Notice.id))
        .where(within(Notice.at), Notice.kind.in_(("yellow", "red")))
        .group_by(Notice.unit_code, Notice.kind)
    ):
        if u := unit(code):
            setattr(u, kind, getattr(u, kind) + n)

    _kb_upkeep(session, start, end, unit)
    report.repeats = _repeats(session, start, end, unit)
    report.hotspots = hotspots(session, start, end)
    report.units = sorted(
        (u for u in stats.values() if u.active()), key=lambda u: (-u.dispatched, -u.finished, u.unit)
    )
    return report


def _kb_upkeep(session: Session, start: datetime, end: datetime, unit) -> None:
    for code, n in session.execute(
        select(KBEntry.unit, func.count(func.distinct(KBEntryVersion.entry_id)))
        .join(KBEntry, KBEntry.id == KBEntryVersion.entry_id)
        .where(KBEntryVersion.changed_at >= start, KBEntryVersion.changed_at < end)
        .group_by(KBEntry.unit)
    ):
        if u := unit(code):
            u.kb_updated += n
    from kb.store import stale_report

    for code, items in stale_report(session, on=(end - timedelta(seconds=1)).date()).items():
        if u := unit(code):
            u.kb_stale += len(items)


def _repeats(session: Session, start: datetime, end: datetime, unit) -> list[RepeatItem]:
    rows = session.execute(
        select(Ticket.number, Ticket.lead_unit, Ticket.repeat_of_id)
        .where(Ticket.created_at >= start, Ticket.created_at < end, Ticket.repeat_of_id.is_not(None))
        .order_by(Ticket.id)
    ).all()
    olds = dict(
        session.execute(
            select(Ticket.id, Ticket.number).where(Ticket.id.in_({r.repeat_of_id for r in rows}))
        ).all()
    )
    old_units = dict(
        session.execute(
            select(Ticket.id, Ticket.lead_unit).where(Ticket.id.in_({r.repeat_of_id for r in rows}))
        ).all()
    )
    items = []
    for r in rows:
        code = r.lead_unit or old_units.get(r.repeat_of_id)
        if u := unit(code):
            u.repeats += 1
        items.append(RepeatItem(r.number, olds.get(r.repeat_of_id, "?"), code))
    return items


# --------------------------------------------------------------------------- hotspots


def _tokens(text: str) -> list[str]:
    from triage.tokenizer import tokenize

    return [w for w in tokenize(text) if w not in _STOP and not w.isdigit()]


def _tfidf(texts: list[str]):
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        return TfidfVectorizer(analyzer=_tokens, sublinear_tf=True).fit_transform(texts)
    except ValueError:  # no words at all
        return None


def cluster_texts(texts: list[str], threshold: float = HOTSPOT_THRESHOLD) -> list[list[int]]:
    """Indices of ``texts`` grouped into clusters: in input order, each text joins the cluster whose centre
    (the sum of its members' TF-IDF vectors) is most similar to it if the cosine similarity reaches
    ``threshold``, else starts a new cluster. Deterministic; O(n²) in numpy blocks, no n×n matrix kept."""
    import numpy as np

    n = len(texts)
    matrix = _tfidf(texts) if n else None
    if matrix is None:
        return [[i] for i in range(n)]
    labels = np.zeros(n, dtype=np.int64)
    norm2 = np.zeros(n)  # squared norm of each cluster's vector sum
    k = 0
    block_rows = 512
    for lo in range(0, n, block_rows):
        hi = min(n, lo + block_rows)
        block = (matrix[lo:hi] @ matrix[:hi].T).toarray()
        for i in range(lo, hi):
            own = block[i - lo, i]
            if k and own > 0:
                dots = np.bincount(labels[:i], weights=block[i - lo, :i], minlength=k)
                sims = dots / np.sqrt(np.maximum(norm2[:k], 1e-12))
                best = int(np.argmax(sims))
                if sims[best] >= threshold:
                    labels[i] = best
                    norm2[best] += 2 * dots[best] + own
                    continue
            labels[i] = k
            norm2[k] = own
            k += 1
    members: list[list[int]] = [[] for _ in range(k)]
    for i, c in enumerate(labels):
        members[int(c)].append(i)
    return members


def _representative(matrix_rows, idx: list[int]) -> int:
    import numpy as np

    vecs = matrix_rows[idx].toarray()
    centre = vecs.sum(axis=0)
    sims = vecs @ centre
    return idx[int(np.argmax(sims))]  # argmax takes the first of equals: the earliest message


def hotspots(
    session: Session, start: datetime, end: datetime, *, threshold: float = HOTSPOT_THRESHOLD
) -> list[Hotspot]:
    """The period's largest clusters of similar requests (at least HOTSPOT_MIN_COUNT each)."""
    rows = session.execute(
        select(Ticket.number, Ticket.original_text, Ticket.lead_unit)
        .where(Ticket.created_at >= start, Ticket.created_at < end, Ticket.status != "redirected")
        .order_by(Ticket.id)
    ).all()
    texts = [r.original_text for r in rows]
    clusters = [c for c in cluster_texts(texts, threshold) if len(c) >= HOTSPOT_MIN_COUNT]
    if not clusters:
        return []
    matrix = _tfidf(texts)
    clusters.sort(key=lambda c: (-len(c), c[0]))
    out = []
    for c in clusters[:HOTSPOT_TOP]:
        rep = _representative(matrix, c)
        units = [
            code for code, _ in Counter(rows[i].lead_unit for i in c if rows[i].lead_unit).most_common(2)
        ]
        text = mask_text(texts[rep]).replace("\n", " ")
        out.append(
            Hotspot(
                count=len(c),
                text=text[:60] + ("…" if len(text) > 60 else ""),
                units=units,
                numbers=[rows[i].number for i in c[:5]],
            )
        )
    return out


# --------------------------------------------------------------------------- rendering


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.1f}%"


def render_text(report: Report) -> str:
    """The report as the center reads it in its group chat (Chinese)."""
    total = report.totals()
    names = {u.unit: u.name for u in report.units}
    lines = [
        f"【{report.title}】",
        f"受理诉求 {report.received} 件，转办 {total.dispatched} 件，办结 {total.finished} 件；"
        f"按期办结率 {_pct(total.on_time_rate)}，满意率 {_pct(total.satisfaction_rate)}"
        f"（已评价 {total.rated} 件，未评价 {total.no_rating} 件不计入）；"
        f"黄牌 {total.yellow} 张，红牌 {total.red} 张。",
    ]
    if report.units:
        lines.append("")
        lines.append("各承办单位：")
    for u in report.units:
        lines.append(
            f"· {u.name}：转办 {u.dispatched}，办结 {u.finished}（按期 {u.on_time}"
            + (f"，超期未办结 {u.overdue_unfinished}" if u.overdue_unfinished else "")
            + f"），按期办结率 {_pct(u.on_time_rate)}；满意率 {_pct(u.satisfaction_rate)}"
            f"（满意/基本满意 {u.satisfied}，不满意 {u.unsatisfied}，未评价 {u.no_rating}）；"
            f"退回 {u.returns}，延期 {u.extensions}，重办 {u.redos}；"
            f"黄牌 {u.yellow}，红牌 {u.red}；知识库更新 {u.kb_updated} 条、待复核 {u.kb_stale} 条"
            + (f"；重复投诉 {u.repeats} 件" if u.repeats else "")
        )
    lines.append("")
    if report.hotspots:
        lines.append("热点诉求：")
        for i, h in enumerate(report.hotspots, 1):
            who = "、".join(names.get(c, c) for c in h.units)
            lines.append(f"{i}. {h.count} 件：{h.text}" + (f"（{who}）" if who else ""))
    else:
        lines.append("热点诉求：本期没有集中反映的问题。")
    if report.repeats:
        lines.append(f"重复投诉 {len(report.repeats)} 件：")
        for r in report.repeats[:20]:
            lines.append(
                f"  {r.number}（与 {r.of_number} 重复，{names.get(r.unit or '', r.unit or '未派单')}）"
            )
        if len(report.repeats) > 20:
            lines.append(f"  …等 {len(report.repeats)} 件")
    else:
        lines.append("重复投诉：无。")
    return "\n".join(lines)


_CJK_HINTS = (
    "Noto Sans CJK",
    "Noto Serif CJK",
    "Source Han",
    "WenQuanYi",
    "SimHei",
    "SimSun",
    "Microsoft YaHei",
    "PingFang",
    "Heiti",
    "AR PL",
    "Droid Sans Fallback",
)


@lru_cache(maxsize=1)
def cjk_font() -> str | None:
    """A font family matplotlib knows that can draw Chinese, or None (``fc-list :lang=zh`` first)."""
    from matplotlib import font_manager

    known = {f.name for f in font_manager.fontManager.ttflist}
    try:
        out = subprocess.run(
            ["fc-list", ":lang=zh", "family"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        for family in line.split(","):
            if family.strip() in known:
                return family.strip()
    for name in sorted(known):
        if any(h.lower() in name.lower() for h in _CJK_HINTS):
            return name
    return None


def render_png(report: Report, path: Path) -> Path:
    """A chart per unit: on-time and satisfaction rates, yellow and red cards (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    font = cjk_font()
    if font is None:
        log.warning(
            "no Chinese font found (fc-list :lang=zh is empty): the report chart labels units by code"
        )
    units = report.units or [UnitStats("-", "-")]
    labels = [u.name if font else u.unit for u in units]
    rc = {"font.sans-serif": [font, "DejaVu Sans"], "axes.unicode_minus": False} if font else {}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with plt.rc_context(rc):
        height = max(3.0, 0.45 * len(units) + 1.5)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, height), sharey=True)
        y = list(range(len(units)))
        on_time = [100 * (u.on_time_rate or 0) for u in units]
        satisfied = [100 * (u.satisfaction_rate or 0) for u in units]
        ax1.barh([i - 0.2 for i in y], on_time, height=0.4, label="按期办结率" if font else "on-time %")
        ax1.barh([i + 0.2 for i in y], satisfied, height=0.4, label="满意率" if font else "satisfaction %")
        ax1.set_xlim(0, 100)
        ax1.set_yticks(y, labels)
        ax1.invert_yaxis()
        ax1.legend(loc="lower right", fontsize=8)
        ax1.set_title("按期办结率 / 满意率 (%)" if font else "on-time / satisfaction (%)")
        yellow = [u.yellow for u in units]
        red = [u.red for u in units]
        ax2.barh(y, yellow, color="#f2c200", label="黄牌" if font else "yellow cards")
        ax2.barh(y, red, left=yellow, color="#d62728", label="红牌" if font else "red cards")
        ax2.legend(loc="lower right", fontsize=8)
        ax2.set_title("红黄牌" if font else "red / yellow cards")
        last = report.end - timedelta(days=1)
        fig.suptitle(
            report.title
            if font
            else f"12345 {report.period} report {report.start:%Y-%m-%d} - {last:%Y-%m-%d}"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return path


CSV_COLUMNS = [
    ("unit", "单位代码"),
    ("name", "单位名称"),
    ("dispatched", "转办"),
    ("finished", "办结"),
    ("on_time", "按期办结"),
    ("overdue_unfinished", "超期未办结"),
    ("on_time_rate", "按期办结率"),
    ("satisfied", "满意及基本满意"),
    ("unsatisfied", "不满意"),
    ("no_rating", "未评价"),
    ("satisfaction_rate", "满意率"),
    ("returns", "退回"),
    ("extensions", "延期"),
    ("redos", "重办"),
    ("kb_updated", "知识库更新"),
    ("kb_stale", "知识库待复核"),
    ("yellow", "黄牌"),
    ("red", "红牌"),
    ("repeats", "重复投诉"),
]


def write_files(report: Report, out_dir: Path) -> list[Path]:
    """The chart (PNG), the per-unit table and the hotspots (CSV, UTF-8 with BOM for spreadsheet programs)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last = report.end - timedelta(days=1)
    stem = f"{report.period}_{report.start:%Y%m%d}_{last:%Y%m%d}"
    png = render_png(report, out_dir / f"{stem}.png")
    units_csv = out_dir / f"{stem}_units.csv"
    with units_csv.open("w", encoding="utf-8-sig", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([zh for _, zh in CSV_COLUMNS])
        for u in [*report.units, report.totals()]:
            row = []
            for key, _ in CSV_COLUMNS:
                value = getattr(u, key)
                row.append("" if value is None else (f"{value:.4f}" if isinstance(value, float) else value))
            w.writerow(row)
    hot_csv = out_dir / f"{stem}_hotspots.csv"
    with hot_csv.open("w", encoding="utf-8-sig", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["序号", "件数", "代表诉求", "主要承办单位", "工单编号（部分）"])
        for i, h in enumerate(report.hotspots, 1):
            w.writerow([i, h.count, h.text, " ".join(h.units), " ".join(h.numbers)])
    return [png, units_csv, hot_csv]


def post_report(session: Session, report: Report, png: Path | None) -> int:
    """Queue the report for the center's group(s): the text (split under Telegram's 4096 limit) and the chart
    as a photo (the Telegram sender sends ``markup["photo"]`` as a photo). Returns messages queued."""
    key = f"report:{report.period}:{report.start:%Y%m%d}"
    chunks, cur = [], ""
    for line in render_text(report).splitlines():
        if len(cur) + len(line) + 1 > 3800:
            chunks.append(cur)
            cur = ""
        cur = f"{cur}\n{line}" if cur else line
    chunks.append(cur)
    n = 0
    for chat in chats_of_unit(session, CENTER):
        for i, text in enumerate(chunks):
            if enqueue(
                session,
                channel="telegram",
                chat_id=chat,
                reply=Reply(text),
                kind="report",
                dedupe_key=f"{key}:{i}:{chat}",
            ):
                n += 1
        if png is not None:
            msg = enqueue(
                session,
                channel="telegram",
                chat_id=chat,
                reply=Reply(f"{report.title} 图表"),
                kind="report",
                dedupe_key=f"{key}:png:{chat}",
            )
            if msg is not None:
                msg.markup = {"photo": str(png)}
                n += 1
    if n == 0:
        log.warning("no center group bound: the %s report was not posted", report.period)
    return n
