"""Import and export of knowledge-base entries as YAML or CSV (a spreadsheet units can fill in).

Round trip: exporting, importing into an empty database and exporting again gives the same content. Each
imported change is one "import" version in the entry's history; unchanged records are left alone, so
importing the same file twice is idempotent. ``load_seed`` only adds missing entries.

CSV layout: one row per entry; the multi-valued cells ``questions`` and ``tags`` hold one value per line.
Files are UTF-8 with a byte-order mark so that spreadsheet programs show the Chinese text correctly.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.orm import Session

from kb.store import Editor, KBError, apply_record, get, list_entries, snapshot

SEED_PATH = Path(__file__).parent / "data" / "seed_kb.yaml"
CSV_COLUMNS = (
    "id",
    "unit",
    "status",
    "questions",
    "answer",
    "basis",
    "tags",
    "valid_from",
    "valid_to",
    "version",
    "updated_at",
    "reviewed_at",
    "updated_by",
)
MULTI_VALUED = ("questions", "tags")


@dataclass
class ImportResult:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # Chinese, one per refused record

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        text = f"新增 {len(self.created)} 条，更新 {len(self.updated)} 条，未变 {len(self.unchanged)} 条"
        if self.errors:
            text += f"，失败 {len(self.errors)} 条：\n" + "\n".join(self.errors)
        return text


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


def import_records(
    session: Session,
    records: list[dict[str, Any]],
    editor: Editor,
    note: str = "导入",
    *,
    create_only: bool = False,
) -> ImportResult:
    """Apply records one by one; a refused record is reported and skipped, the others go in.

    ``create_only``: leave entries that already exist as they are (counted as unchanged).
    """
    result = ImportResult()
    for number, raw in enumerate(records, start=1):
        record = {k: _plain(v) for k, v in raw.items()}
        label = record.get("id") or f"第 {number} 条"
        if create_only and record.get("id") and get(session, str(record["id"]).strip()) is not None:
            result.unchanged.append(str(record["id"]).strip())
            continue
        try:
            outcome = apply_record(session, editor, record, note=note)
        except KBError as exc:
            result.errors.append(f"{label}：{exc}")
            continue
        getattr(result, outcome).append(str(record.get("id") or label))
    return result


def _load_yaml_records(path: Path | str) -> list[dict[str, Any]]:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or []
    if isinstance(data, dict):
        data = data.get("entries", [])
    if not isinstance(data, list):
        raise KBError(f"文件格式不正确：{path} 应为条目列表")
    return data


def import_yaml(session: Session, path: Path | str, editor: Editor | None = None) -> ImportResult:
    return import_records(session, _load_yaml_records(path), editor or Editor.center("import"))


def import_csv(session: Session, path: Path | str, editor: Editor | None = None) -> ImportResult:
    with Path(path).open(encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    records = []
    for row in rows:
        record: dict[str, Any] = {}
        for key, value in row.items():
            if key is None or key not in CSV_COLUMNS:
                continue
            value = (value or "").strip()
            if key in MULTI_VALUED:
                record[key] = [line.strip() for line in value.splitlines() if line.strip()]
            elif key in ("valid_from", "valid_to", "reviewed_at"):
                record[key] = value or None
            elif key in ("version", "updated_at", "updated_by"):
                continue  # bookkeeping of the exporting database, not content
            else:
                record[key] = value
        records.append(record)
    return import_records(session, records, editor or Editor.center("import"))


def _export_records(session: Session, unit: str | None, status: str | None) -> list[dict[str, Any]]:
    return [snapshot(e) for e in list_entries(session, unit=unit, status=status)]


def export_yaml(
    session: Session, path: Path | str, *, unit: str | None = None, status: str | None = None
) -> int:
    """Write entries (all, or one unit's / one status's) to a YAML file; returns how many."""
    records = _export_records(session, unit, status)
    text = yaml.safe_dump(records, allow_unicode=True, sort_keys=False, width=1000)
    Path(path).write_text(text, encoding="utf-8")
    return len(records)


def export_csv(
    session: Session, path: Path | str, *, unit: str | None = None, status: str | None = None
) -> int:
    records = _export_records(session, unit, status)
    with Path(path).open("w", encoding="utf-8-sig", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for record in records:
            row = {k: record.get(k) for k in CSV_COLUMNS}
            for key in MULTI_VALUED:
                row[key] = "\n".join(record.get(key) or [])
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return len(records)


def load_seed(session: Session, path: Path | str = SEED_PATH) -> ImportResult:
    """Add the shipped seed entries that the database does not have yet; safe to run at every start.

    Entries already present are never overwritten: once seeded, an entry belongs to its unit, which keeps it
    current ("谁提供、谁负责、谁更新", 渠县 第十三条). To push a changed seed file over existing entries, use
    ``import_yaml`` (each change becomes a version).
    """
    records = _load_yaml_records(path)
    return import_records(session, records, Editor.center("seed"), note="种子知识库", create_only=True)
