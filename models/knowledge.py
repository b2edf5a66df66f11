"""Knowledge-base tables: entries kept by the responsible units, and every version of them.

Units provide, own and update their entries ("谁提供、谁负责、谁更新", 渠县 第十三条; 平利 第二十一条);
the hotline answers consultations from published entries at once (平利 第八条, 大连 第十六条).
Only a published entry inside its validity dates may answer a citizen.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import JSON, Date, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, TZDateTime

KB_STATUSES = ("draft", "published", "retired")
KB_STATUS_ZH = {"draft": "草稿", "published": "已发布", "retired": "已停用"}


class KBEntry(Base):
    """One knowledge-base answer with the phrasings citizens use to ask for it."""

    __tablename__ = "kb_entries"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # "kb-0001"
    unit: Mapped[str] = mapped_column(String(32), index=True)  # owning unit code, e.g. "renshe"
    questions: Mapped[list[str]] = mapped_column(JSON, default=list)  # one or more phrasings
    answer: Mapped[str] = mapped_column(Text)
    basis: Mapped[str] = mapped_column(Text, default="")  # the law, policy or notice the answer rests on
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    valid_from: Mapped[date | None] = mapped_column(Date, nullable=True)
    valid_to: Mapped[date | None] = mapped_column(Date, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="draft", index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(TZDateTime)
    updated_at: Mapped[datetime] = mapped_column(TZDateTime)
    reviewed_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    updated_by: Mapped[str] = mapped_column(String(64), default="")

    versions: Mapped[list[KBEntryVersion]] = relationship(
        back_populates="entry",
        order_by="KBEntryVersion.version",
        cascade="all, delete-orphan",
    )

    def is_answerable(self, today: date) -> bool:
        """Published and inside its validity dates (both ends inclusive)."""
        if self.status != "published":
            return False
        if self.valid_from is not None and today < self.valid_from:
            return False
        return not (self.valid_to is not None and today > self.valid_to)

    def __repr__(self) -> str:
        return f"<KBEntry {self.id} {self.unit} {self.status} v{self.version}>"


class KBEntryVersion(Base):
    """A snapshot of an entry after one change: who changed which fields, when, and why."""

    __tablename__ = "kb_entry_versions"
    __table_args__ = (UniqueConstraint("entry_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    entry_id: Mapped[str] = mapped_column(ForeignKey("kb_entries.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(16))  # create | edit | publish | retire | review | import
    changed_fields: Mapped[list[str]] = mapped_column(JSON, default=list)
    snapshot: Mapped[dict[str, Any]] = mapped_column(JSON)
    changed_by: Mapped[str] = mapped_column(String(64))
    changed_at: Mapped[datetime] = mapped_column(TZDateTime)
    note: Mapped[str] = mapped_column(Text, default="")

    entry: Mapped[KBEntry] = relationship(back_populates="versions")

    def __repr__(self) -> str:
        return f"<KBEntryVersion {self.entry_id} v{self.version} {self.action} by {self.changed_by}>"
