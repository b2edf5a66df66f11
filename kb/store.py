"""Service functions for the knowledge base: the bot and the command line call these, tests call them directly.

Rules encoded here:
- units provide, own and update their entries: "谁提供、谁负责、谁更新" (渠县 第十三条; 平利 第二十一条), so unit
  staff may create and change only their own unit's entries; the hotline center (渠县 第十四条: 统筹采编与维护)
  may change any entry;
- every change is kept as a numbered version with who, when, which fields and why (渠县 第十四条: 多方校核、查漏纠错);
- only published entries inside their validity dates answer citizens (平利 第八条, 大连 第十六条);
- entries past their end date or not reviewed for a while are reported to their unit (渠县 第十三条: 及时、准确).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.clock import CHINA_TZ, now
from models.knowledge import KB_STATUS_ZH, KB_STATUSES, KBEntry, KBEntryVersion

ENTRY_ID = re.compile(r"^kb-\d{4,}$")
CONTENT_FIELDS = ("unit", "questions", "answer", "basis", "tags", "valid_from", "valid_to", "status")
EDITABLE_FIELDS = ("unit", "questions", "answer", "basis", "tags", "valid_from", "valid_to")
DEFAULT_REVIEW_DAYS = 180


class KBError(Exception):
    """A knowledge-base operation was refused; ``str(error)`` is a Chinese message for the user."""


class KBNotFound(KBError):
    pass


class KBPermissionError(KBError):
    pass


class KBValidationError(KBError):
    pass


@dataclass(frozen=True)
class Editor:
    """Who makes a change. ``unit`` is the staff member's unit code; ``None`` means the hotline center or an
    administrator, who may maintain every unit's entries."""

    who: str
    unit: str | None = None

    @classmethod
    def center(cls, who: str = "center") -> Editor:
        return cls(who=who, unit=None)

    @property
    def is_center(self) -> bool:
        return self.unit is None


@dataclass(frozen=True)
class StaleItem:
    entry_id: str
    unit: str
    reason: str  # "expired" | "unreviewed"
    detail: str  # Chinese, for the unit's chat
    valid_to: date | None
    last_reviewed: datetime | None


def today() -> date:
    """The hotline's current calendar date (China time)."""
    return now().astimezone(CHINA_TZ).date()


# ---------------------------------------------------------------- normalisation


def _clean_list(values: Iterable[str] | str | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    seen: list[str] = []
    for value in values:
        text = str(value).strip()
        if text and text not in seen:
            seen.append(text)
    return seen


def _as_date(value: date | str | None, field: str) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value).strip())
    except ValueError as exc:
        raise KBValidationError(f"日期格式不正确（{field}）：{value}，应为 YYYY-MM-DD") from exc


def _normalise(changes: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if key in ("questions", "tags"):
            out[key] = _clean_list(value)
        elif key in ("valid_from", "valid_to"):
            out[key] = _as_date(value, key)
        elif key in ("answer", "basis", "unit", "status"):
            out[key] = (value or "").strip()
        else:
            raise KBValidationError(f"不能修改字段：{key}")
    return out


def _validate(entry: KBEntry) -> None:
    if not ENTRY_ID.match(entry.id or ""):
        raise KBValidationError(f"条目编号格式不正确：{entry.id}，应为 kb-0001 这样的编号")
    if not entry.unit:
        raise KBValidationError("请填写负责该条目的单位")
    if not entry.questions:
        raise KBValidationError("请至少填写一种问法")
    if not entry.answer:
        raise KBValidationError("答复内容不能为空")
    if entry.status not in KB_STATUSES:
        raise KBValidationError(
            f"状态不正确：{entry.status}（可选：草稿 draft、已发布 published、已停用 retired）"
        )
    if entry.valid_from and entry.valid_to and entry.valid_from > entry.valid_to:
        raise KBValidationError(f"有效期不正确：开始日期 {entry.valid_from} 晚于结束日期 {entry.valid_to}")


def _check_merged(entry: KBEntry, new: dict[str, Any]) -> None:
    """Validate ``entry`` with ``new`` applied, before touching the stored object."""
    merged = {k: getattr(entry, k) for k in CONTENT_FIELDS} | new
    probe = KBEntry(id=entry.id, **merged)
    _validate(probe)
    if probe.status == "published":
        _check_publishable(probe)


def snapshot(entry: KBEntry) -> dict[str, Any]:
    """The entry's content and bookkeeping as plain JSON-able values (used for versions and export)."""
    return {
        "id": entry.id,
        "unit": entry.unit,
        "questions": list(entry.questions or []),
        "answer": entry.answer,
        "basis": entry.basis or "",
        "tags": list(entry.tags or []),
        "valid_from": entry.valid_from.isoformat() if entry.valid_from else None,
        "valid_to": entry.valid_to.isoformat() if entry.valid_to else None,
        "status": entry.status,
        "version": entry.version,
        "updated_at": entry.updated_at.isoformat() if entry.updated_at else None,
        "reviewed_at": entry.reviewed_at.isoformat() if entry.reviewed_at else None,
        "updated_by": entry.updated_by or "",
    }


def _record(
    session: Session, entry: KBEntry, editor: Editor, action: str, fields: list[str], note: str
) -> KBEntryVersion:
    version = KBEntryVersion(
        entry_id=entry.id,
        version=entry.version,
        action=action,
        changed_fields=fields,
        snapshot=snapshot(entry),
        changed_by=editor.who,
        changed_at=entry.updated_at,
        note=note,
    )
    session.add(version)
    return version


def _check_unit(editor: Editor, unit: str, entry_id: str | None = None) -> None:
    """渠县 第十三条 "谁提供、谁负责、谁更新": unit staff maintain only their own unit's entries."""
    if editor.is_center or editor.unit == unit:
        return
    if entry_id:
        raise KBPermissionError(
            f"无权修改：知识条目 {entry_id} 由单位 {unit} 负责维护，您所在单位（{editor.unit}）只能维护本单位的条目。"
        )
    raise KBPermissionError(
        f"无权新建：您所在单位（{editor.unit}）只能为本单位新建知识条目，不能代 {unit} 新建。"
    )


# ---------------------------------------------------------------- reading


def get(session: Session, entry_id: str) -> KBEntry | None:
    return session.get(KBEntry, entry_id)


def require(session: Session, entry_id: str) -> KBEntry:
    entry = session.get(KBEntry, entry_id)
    if entry is None:
        raise KBNotFound(f"知识条目 {entry_id} 不存在")
    return entry


def history(session: Session, entry_id: str) -> list[KBEntryVersion]:
    """Every version of the entry, oldest first."""
    require(session, entry_id)
    stmt = select(KBEntryVersion).where(KBEntryVersion.entry_id == entry_id).order_by(KBEntryVersion.version)
    return list(session.scalars(stmt))


def list_entries(
    session: Session,
    *,
    unit: str | None = None,
    status: str | None = None,
    tag: str | None = None,
    text: str | None = None,
) -> list[KBEntry]:
    """Entries filtered by owning unit, status, tag, and a substring of a question, the answer or the basis."""
    stmt = select(KBEntry).order_by(KBEntry.id)
    if unit:
        stmt = stmt.where(KBEntry.unit == unit)
    if status:
        stmt = stmt.where(KBEntry.status == status)
    entries = list(session.scalars(stmt))
    if tag:
        entries = [e for e in entries if tag in (e.tags or [])]
    if text:
        needle = text.strip()
        entries = [
            e
            for e in entries
            if needle in e.answer or needle in (e.basis or "") or any(needle in q for q in e.questions)
        ]
    return entries


def answerable_entries(session: Session, on: date | None = None) -> list[KBEntry]:
    """Published entries whose validity dates include ``on`` (today by default): the only ones that answer."""
    day = on or today()
    stmt = select(KBEntry).where(KBEntry.status == "published").order_by(KBEntry.id)
    return [e for e in session.scalars(stmt) if e.is_answerable(day)]


def fingerprint(session: Session) -> tuple[int, int]:
    """A cheap summary that changes whenever any entry changes: (entries, sum of their version numbers)."""
    row = session.execute(select(func.count(KBEntry.id), func.coalesce(func.sum(KBEntry.version), 0))).one()
    return int(row[0]), int(row[1])


def next_entry_id(session: Session) -> str:
    numbers = [int(i[3:]) for i in session.scalars(select(KBEntry.id)) if ENTRY_ID.match(i)]
    return f"kb-{(max(numbers) if numbers else 0) + 1:04d}"


# ---------------------------------------------------------------- changing


def create_entry(
    session: Session,
    editor: Editor,
    *,
    questions: Iterable[str] | str,
    answer: str,
    unit: str | None = None,
    basis: str = "",
    tags: Iterable[str] = (),
    valid_from: date | str | None = None,
    valid_to: date | str | None = None,
    status: str = "draft",
    entry_id: str | None = None,
    reviewed_at: datetime | None = None,
    note: str = "",
    action: str = "create",
) -> KBEntry:
    """Create an entry (a draft unless ``status`` says otherwise) and record version 1.

    Unit staff create entries for their own unit; ``unit`` defaults to the editor's unit.
    """
    unit = (unit or editor.unit or "").strip()
    _check_unit(editor, unit)
    fields = _normalise(
        {
            "questions": questions,
            "answer": answer,
            "unit": unit,
            "basis": basis,
            "tags": tags,
            "valid_from": valid_from,
            "valid_to": valid_to,
            "status": status,
        }
    )
    entry_id = (entry_id or "").strip() or next_entry_id(session)
    if session.get(KBEntry, entry_id) is not None:
        raise KBValidationError(f"知识条目 {entry_id} 已存在")
    if fields["status"] == "published":
        _check_publishable_fields(entry_id, fields)
    stamp = now()
    entry = KBEntry(
        id=entry_id,
        version=1,
        created_at=stamp,
        updated_at=stamp,
        reviewed_at=reviewed_at or stamp,
        updated_by=editor.who,
        **fields,
    )
    _validate(entry)
    session.add(entry)
    session.flush()
    _record(session, entry, editor, action, sorted(fields), note)
    session.flush()
    return entry


def edit_entry(session: Session, editor: Editor, entry_id: str, *, note: str = "", **changes: Any) -> KBEntry:
    """Change some of questions / answer / basis / tags / valid_from / valid_to (and unit, center only).

    A real change makes a new version that records who changed which fields; an edit counts as a review.
    Editing does not change the status: a published entry answers with its new text at once.
    """
    entry = require(session, entry_id)
    _check_unit(editor, entry.unit, entry_id)
    unknown = set(changes) - set(EDITABLE_FIELDS)
    if unknown:
        raise KBValidationError(f"不能修改字段：{'、'.join(sorted(unknown))}（状态请用发布/停用）")
    new = _normalise(changes)
    if "unit" in new and new["unit"] != entry.unit and not editor.is_center:
        raise KBPermissionError("无权转移：只有热线受理中心可以把知识条目改由其他单位负责。")
    changed = [k for k, v in new.items() if getattr(entry, k) != v]
    if not changed:
        return entry
    _check_merged(entry, {k: new[k] for k in changed})
    for key in changed:
        setattr(entry, key, new[key])
    _bump(entry, editor)
    entry.reviewed_at = entry.updated_at
    _record(session, entry, editor, "edit", sorted(changed), note)
    session.flush()
    return entry


def _check_publishable_fields(entry_id: str, fields: dict[str, Any]) -> None:
    if not fields.get("basis"):
        raise KBValidationError(f"知识条目 {entry_id} 缺少答复依据（政策文件或规定），不能发布")
    end = fields.get("valid_to")
    if end is not None and end < today():
        raise KBValidationError(f"知识条目 {entry_id} 的有效期已于 {end} 结束，请先更新有效期再发布")


def _check_publishable(entry: KBEntry) -> None:
    _check_publishable_fields(entry.id, {"basis": entry.basis, "valid_to": entry.valid_to})


def _bump(entry: KBEntry, editor: Editor) -> None:
    entry.version += 1
    entry.updated_at = now()
    entry.updated_by = editor.who


def _set_status(session: Session, editor: Editor, entry_id: str, status: str, note: str) -> KBEntry:
    entry = require(session, entry_id)
    _check_unit(editor, entry.unit, entry_id)
    if entry.status == status:
        raise KBValidationError(f"知识条目 {entry_id} 已经是{KB_STATUS_ZH[status]}状态")
    if status == "published":
        _check_publishable(entry)
    entry.status = status
    _bump(entry, editor)
    if status == "published":
        entry.reviewed_at = entry.updated_at
    _record(session, entry, editor, "publish" if status == "published" else "retire", ["status"], note)
    session.flush()
    return entry


def publish(session: Session, editor: Editor, entry_id: str, note: str = "") -> KBEntry:
    """Make a draft or retired entry answer citizens (needs a basis and an unexpired validity period)."""
    return _set_status(session, editor, entry_id, "published", note)


def retire(session: Session, editor: Editor, entry_id: str, note: str = "") -> KBEntry:
    """Stop an entry from answering; it stays in the history and can be published again."""
    return _set_status(session, editor, entry_id, "retired", note)


def review(session: Session, editor: Editor, entry_id: str, note: str = "") -> KBEntry:
    """Confirm that an entry is still correct without changing it (clears it from the stale report)."""
    entry = require(session, entry_id)
    _check_unit(editor, entry.unit, entry_id)
    _bump(entry, editor)
    entry.reviewed_at = entry.updated_at
    _record(session, entry, editor, "review", ["reviewed_at"], note)
    session.flush()
    return entry


def apply_record(session: Session, editor: Editor, record: dict[str, Any], note: str = "导入") -> str:
    """Create or update one entry from an imported record; returns "created", "updated" or "unchanged".

    An update records one "import" version with the changed fields, the status included. ``reviewed_at`` from
    the record is kept for new entries (moving a knowledge base keeps its review dates).
    """
    entry_id = str(record.get("id") or "").strip()
    content = _normalise({k: record.get(k) for k in CONTENT_FIELDS if k in record})
    reviewed = record.get("reviewed_at")
    if isinstance(reviewed, str) and reviewed:
        try:
            reviewed = datetime.fromisoformat(reviewed)
        except ValueError as exc:
            raise KBValidationError(f"复核时间格式不正确：{reviewed}") from exc
    if isinstance(reviewed, datetime) and reviewed.tzinfo is None:
        reviewed = reviewed.replace(tzinfo=CHINA_TZ)
    existing = session.get(KBEntry, entry_id) if entry_id else None
    if existing is None:
        create_entry(
            session,
            editor,
            entry_id=entry_id or None,
            status=content.pop("status", None) or "draft",
            reviewed_at=reviewed if isinstance(reviewed, datetime) else None,
            note=note,
            action="import",
            questions=content.pop("questions", []),
            answer=content.pop("answer", ""),
            **content,
        )
        return "created"
    _check_unit(editor, existing.unit, entry_id)
    changed = [k for k, v in content.items() if getattr(existing, k) != v]
    if not changed:
        return "unchanged"
    if "unit" in changed and not editor.is_center:
        raise KBPermissionError("无权转移：只有热线受理中心可以把知识条目改由其他单位负责。")
    _check_merged(existing, {k: content[k] for k in changed})
    for key in changed:
        setattr(existing, key, content[key])
    _bump(existing, editor)
    existing.reviewed_at = existing.updated_at  # a changed entry has just been looked at
    _record(session, existing, editor, "import", sorted(changed), note)
    session.flush()
    return "updated"


# ---------------------------------------------------------------- stale report


def stale_report(
    session: Session, *, review_days: int = DEFAULT_REVIEW_DAYS, on: date | None = None
) -> dict[str, list[StaleItem]]:
    """Published entries that need their unit's attention, grouped by unit code.

    "expired": past valid_to, so it no longer answers; "unreviewed": not edited, published or reviewed for
    more than ``review_days`` days.
    """
    day = on or today()
    cutoff = datetime.combine(day, datetime.min.time(), tzinfo=CHINA_TZ) - timedelta(days=review_days)
    report: dict[str, list[StaleItem]] = {}
    for entry in list_entries(session, status="published"):
        last = entry.reviewed_at or entry.updated_at
        item: StaleItem | None = None
        if entry.valid_to is not None and entry.valid_to < day:
            item = StaleItem(
                entry.id,
                entry.unit,
                "expired",
                f"有效期已于 {entry.valid_to} 结束，已停止答复",
                entry.valid_to,
                last,
            )
        elif last is not None and last < cutoff:
            days = (day - last.astimezone(CHINA_TZ).date()).days
            item = StaleItem(
                entry.id,
                entry.unit,
                "unreviewed",
                f"已 {days} 天未复核（上次 {last:%Y-%m-%d}）",
                entry.valid_to,
                last,
            )
        if item:
            report.setdefault(entry.unit, []).append(item)
    return dict(sorted(report.items()))


def format_stale_report(report: dict[str, list[StaleItem]], unit: str | None = None) -> str:
    """The stale report as Chinese text for a unit's group chat (one unit) or the center (all units)."""
    units = [unit] if unit else list(report)
    lines: list[str] = []
    for code in units:
        items = report.get(code, [])
        if not items:
            continue
        lines.append(f"【{code}】待更新知识条目 {len(items)} 条：")
        lines.extend(f"  {i.entry_id}：{i.detail}" for i in items)
    return "\n".join(lines) if lines else "没有需要更新的知识条目。"
