"""The default unit catalog (DESIGN.md; codes are a contract) and loading it into the database."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from sqlalchemy.orm import Session

from models.tables import Unit

CATALOG_FILE = Path(__file__).parent / "catalog" / "units.yaml"
CENTER = "center"


@lru_cache(maxsize=4)
def read_catalog(path: str | None = None) -> tuple[dict, ...]:
    with Path(path or CATALOG_FILE).open(encoding="utf-8") as fh:
        return tuple(yaml.safe_load(fh))


def unit_codes(include_center: bool = False) -> list[str]:
    return [u["code"] for u in read_catalog() if include_center or u["code"] != CENTER]


def unit_names() -> dict[str, str]:
    return {u["code"]: u["name"] for u in read_catalog()}


def load_catalog(session: Session, path: str | None = None) -> int:
    """Insert or update every unit of the catalog; returns how many units changed."""
    changed = 0
    entries = read_catalog(path)
    # parents first, so the self-reference is satisfied on every backend
    for entry in sorted(entries, key=lambda e: e.get("level", 2)):
        unit = session.get(Unit, entry["code"])
        if unit is None:
            unit = Unit(code=entry["code"])
            session.add(unit)
            changed += 1
        elif (unit.name, unit.duties) != (entry["name"], entry.get("duties", "")):
            changed += 1
        unit.name = entry["name"]
        unit.level = int(entry.get("level", 2))
        unit.parent_code = entry.get("parent") or None
        unit.duties = entry.get("duties", "")
        session.flush()
    return changed
