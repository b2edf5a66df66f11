"""Small builders shared by the tests (plain functions, no fixtures)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from models.tables import Citizen, Ticket, Unit
from models.workflow import Actor, create_ticket, dispatch, record_triage

CENTER = Actor("center", "op1", unit_code="center", role="operator", name="中心值班员")
SUPERVISOR = Actor("center", "sup1", unit_code="center", role="supervisor", name="中心主任")


def staff(unit: str, uid: str = "s1", role: str = "handler") -> Actor:
    return Actor("staff", uid, unit_code=unit, role=role, name=f"{unit}经办人")


def add_units(session: Session, *codes: str) -> None:
    names = {
        "center": "12345热线受理中心",
        "chengguan": "城市管理局",
        "zhujian": "住房和城乡建设局",
        "shengtai": "生态环境局",
        "gongan": "公安局",
        "renshe": "人力资源和社会保障局",
    }
    for code in codes or tuple(names):
        if session.get(Unit, code) is None:
            session.add(
                Unit(code=code, name=names.get(code, code), level=1 if code == "center" else 2, duties="")
            )
    session.flush()


def citizen(session: Session, ext: str = "1001") -> Citizen:
    c = Citizen(channel="telegram", external_id=ext)
    session.add(c)
    session.flush()
    return c


def dispatched_ticket(
    session: Session,
    *,
    text: str = "小区门口烧烤摊每天晚上占道经营到凌晨，油烟和噪音很大",
    type: str = "complaint",
    policy: str = "quxian",
    lead: str = "chengguan",
    co: tuple[str, ...] = (),
    urgent_level: str | None = None,
    who: Citizen | None = None,
) -> Ticket:
    add_units(session)
    t = create_ticket(session, text=text, policy=policy, citizen=who)
    record_triage(session, t, type=type, units=[lead, *co], confidence=0.9, urgent_level=urgent_level)
    dispatch(session, t, CENTER, lead=lead, co=co)
    return t
