"""Personal data: masking for display and logs, and audited access to the real values.

Every seed obliges the hotline to protect the caller's information (平利 第十九条, 宿迁 第十六条,
渠县 第十七条, 大连 第二十二条, 宿州 保密 rules): names and phone numbers are masked wherever they are
not needed, and each look at the real values is recorded.
"""

from __future__ import annotations

import re

from sqlalchemy.orm import Session

from models.clock import now
from models.tables import Citizen, CitizenPII, PIIAccess

_PHONE = re.compile(r"(?<!\d)(1[3-9]\d)(\d{4})(\d{4})(?!\d)")
_LANDLINE = re.compile(r"(?<!\d)(0\d{2,3}-?)(\d{3,4})(\d{4})(?!\d)")
_IDCARD = re.compile(r"(?<![0-9A-Za-z])(\d{6})(\d{8})(\d{3}[\dXx])(?![0-9A-Za-z])")


def mask_phone(phone: str | None) -> str:
    if not phone:
        return ""
    digits = re.sub(r"\D", "", phone)
    if len(digits) >= 8:
        return digits[:3] + "*" * (len(digits) - 7) + digits[-4:]
    return "*" * len(digits)


def mask_name(name: str | None) -> str:
    """王小明 → 王**, 王先生 stays recognisable as 王先生, Latin names keep the first letter."""
    if not name:
        return ""
    name = name.strip()
    for suffix in ("先生", "女士"):
        if name.endswith(suffix) and len(name) <= 4:
            return name[0] + suffix
    return name[0] + "*" * max(1, len(name) - 1)


def mask_text(text: str) -> str:
    """Mask phone numbers and ID-card numbers inside free text (for logs and group cards)."""
    text = _IDCARD.sub(lambda m: m.group(1) + "********" + m.group(3)[-1:].rjust(4, "*"), text)
    text = _PHONE.sub(lambda m: m.group(1) + "****" + m.group(3), text)
    text = _LANDLINE.sub(lambda m: m.group(1) + "****" + m.group(3), text)
    return text


def contact_masked(citizen: Citizen | None) -> str:
    if citizen is None or citizen.pii is None:
        return "（未留联系方式）"
    parts = [p for p in (mask_name(citizen.pii.name), mask_phone(citizen.pii.phone)) if p]
    return " ".join(parts) or "（未留联系方式）"


def set_contact(session: Session, citizen: Citizen, name: str | None, phone: str | None) -> None:
    pii = session.get(CitizenPII, citizen.id)
    if pii is None:
        pii = CitizenPII(citizen_id=citizen.id)
        session.add(pii)
    if name:
        pii.name = name.strip()[:100]
    if phone:
        pii.phone = re.sub(r"[^\d+]", "", phone)[:32]
    pii.updated_at = now()
    session.flush()
    session.refresh(citizen)


def reveal_contact(
    session: Session, citizen_id: int, viewer: str, *, ticket_id: int | None = None, purpose: str = ""
) -> tuple[str | None, str | None]:
    """The real name and phone, for a staff member who asked; the look is logged."""
    pii = session.get(CitizenPII, citizen_id)
    session.add(
        PIIAccess(citizen_id=citizen_id, ticket_id=ticket_id, viewer=viewer, purpose=purpose, at=now())
    )
    session.flush()
    if pii is None:
        return None, None
    return pii.name, pii.phone
