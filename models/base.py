"""Declarative base and shared column types for the hotline data model."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, MetaData, TypeDecorator
from sqlalchemy.orm import DeclarativeBase

from models.clock import CHINA_TZ

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class TZDateTime(TypeDecorator):
    """Timezone-aware datetimes on every backend: stored as UTC, returned in China time.

    SQLite has no timezone type, so values are normalised to UTC on the way in and re-attached
    on the way out; PostgreSQL stores timestamptz.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a TZDateTime column")
        from datetime import UTC

        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect):
        if value is None:
            return None
        from datetime import UTC

        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(CHINA_TZ)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
