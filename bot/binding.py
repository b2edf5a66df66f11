"""Binding group chats to units and the hotline center, and registering staff.

How people become staff (the decision, documented):
- `hotline bind unit CODE` / `hotline bind center` prints a one-time code (random, 24 h by default).
  Whoever posts ``/bind CODE`` in a group binds that group to the code's unit and is registered as staff
  of that unit with the code's role.
- Telegram does not let a bot list a group's members, so the others are not registered silently: a member
  who is not yet staff and presses a card button is politely refused (nothing changes) and told how to join.
  They join with a one-time code too: the administrator prints another one, or a registered member sends
  ``/invite [role]`` in the group and the new colleague posts ``/join CODE``. An inviter may hand out only
  their own role or a lower one (a handler cannot make a leader).
- Staff belong to a unit, not to a chat: a registered member of a unit may act in any group bound to it.
- A group stays bound to one unit: ``/bind`` with another unit's code in a bound group is refused.

Roles: unit ``handler`` (经办人) and ``leader`` (单位负责人); center ``operator`` (值班员) and
``supervisor`` (负责人). The workflow reads the role where a seed asks for it (e.g. 大连 第十八条: a
second extension is asked by the unit's leader).
"""

from __future__ import annotations

import secrets
import sys
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bot import staff_texts as tx
from bot.messages import Incoming, Reply
from models.catalog import CENTER
from models.clock import now
from models.tables import BindCode, ChatBinding, Staff, Unit

CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read aloud and typed by hand
CODE_LENGTH = 8


class BindError(ValueError):
    """A code could not be made or used; ``str(err)`` is Chinese, for the person who asked."""


def roles_for(unit_code: str) -> tuple[str, ...]:
    return tx.CENTER_ROLES if unit_code == CENTER else tx.UNIT_ROLES


def _new_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def create_bind_code(session: Session, unit_code: str, role: str = "handler", ttl_hours: int = 24) -> str:
    """A one-time code that binds a group to ``unit_code`` (``center`` for the hotline center) or
    registers one more member of it with ``role``."""
    unit = session.get(Unit, unit_code)
    if unit is None or not unit.active:
        raise BindError(f"没有代码为 {unit_code} 的单位（先运行 hotline init 导入单位目录）。")
    if role not in roles_for(unit_code):
        allowed = "、".join(f"{r}（{tx.ROLE_ZH[r]}）" for r in roles_for(unit_code))
        raise BindError(f"{unit.name}的角色只能是：{allowed}。")
    if ttl_hours <= 0:
        raise BindError("有效期必须大于0小时。")
    for _ in range(10):
        code = _new_code()
        if session.get(BindCode, code) is None:
            break
    session.add(
        BindCode(code=code, unit_code=unit_code, role=role, expires_at=now() + timedelta(hours=ttl_hours))
    )
    session.flush()
    return code


def staff_member(session: Session, user_id: str | int, unit_code: str) -> Staff | None:
    try:
        uid = int(user_id)
    except (TypeError, ValueError):
        return None
    return session.scalars(
        select(Staff).where(Staff.user_id == uid, Staff.unit_code == unit_code)
    ).one_or_none()


def _register(session: Session, msg: Incoming, unit_code: str, role: str) -> Staff:
    member = staff_member(session, msg.user_id, unit_code)
    if member is None:
        member = Staff(user_id=int(msg.user_id), unit_code=unit_code, role=role, created_at=now())
        session.add(member)
    member.role = role  # the code says which role this person gets
    member.display_name = (msg.display_name or "")[:100]
    session.flush()
    return member


def _take_code(session: Session, raw: str) -> BindCode | str:
    """The unused, unexpired code, or the Chinese reason it cannot be used."""
    code = session.get(BindCode, raw.strip().upper(), with_for_update=True)
    if code is None:
        return tx.CODE_UNKNOWN
    if code.used_at is not None:
        return tx.CODE_USED
    if code.expires_at < now():
        return tx.CODE_EXPIRED
    return code


def handle_bind(session: Session, msg: Incoming, command: str) -> list[Reply]:
    """``/bind CODE`` (bind this group, register the poster) and ``/join CODE`` (register the poster)."""
    if msg.is_private:
        return [Reply(tx.BIND_PRIVATE)]
    if not msg.args.strip():
        return [Reply(tx.ASK_CODE.format(command=command))]
    try:
        chat_id = int(msg.chat_id)
        int(msg.user_id)
    except ValueError:
        return [Reply(tx.BIND_PRIVATE)]
    code = _take_code(session, msg.args.split()[0])
    if isinstance(code, str):
        return [Reply(code)]
    unit = session.get(Unit, code.unit_code)
    bound = session.get(ChatBinding, chat_id)
    if bound is not None and bound.unit_code != code.unit_code:
        other = session.get(Unit, bound.unit_code)
        return [
            Reply(
                f"本群已绑定{other.name if other else bound.unit_code}，不能再绑定{unit.name}。"
                "每个单位请使用自己的工作群；如需改绑，请联系管理员。"
            )
        ]
    if bound is None and command == "join":
        return [
            Reply(
                f"本群尚未绑定。这是{unit.name}的绑定码：如要把本群绑定为{unit.name}的工作群，请发送 /bind {code.code}"
            )
        ]
    new_binding = bound is None
    if new_binding:
        session.add(
            ChatBinding(chat_id=chat_id, unit_code=code.unit_code, bound_at=now(), bound_by=int(msg.user_id))
        )
    code.used_at = now()
    member = _register(session, msg, code.unit_code, code.role)
    name = tx.who(msg.display_name, msg.user_id)
    role = tx.ROLE_ZH[member.role]
    if new_binding:
        what = "热线中心的待办事项" if code.unit_code == CENTER else "派给本单位的工单"
        return [
            Reply(
                f"✅ 本群已绑定为“{unit.name}”的工作群，{what}将推送到这里。\n"
                f"{name} 已登记为{role}。\n"
                "其他同事请由已登记的人员发送 /invite 获取邀请码，再由本人发送 /join 邀请码 登记；"
                "未登记的人员不能操作工单按钮。发送 /help 查看可用命令。"
            )
        ]
    return [Reply(f"✅ {name} 已登记为{unit.name}{role}，可以在本群办理工单了。")]


def handle_invite(session: Session, msg: Incoming, member: Staff, args: str) -> list[Reply]:
    """``/invite [role]``: a registered member makes a one-time code for a colleague (same role or lower)."""
    unit_code = member.unit_code
    allowed = roles_for(unit_code)
    role = args.split()[0].lower() if args.strip() else allowed[0]
    zh_to_role = {v: k for k, v in tx.ROLE_ZH.items()}
    role = zh_to_role.get(role, role)
    if role not in allowed:
        return [Reply(tx.INVITE_BAD_ROLE.format(roles="、".join(f"{r}（{tx.ROLE_ZH[r]}）" for r in allowed)))]
    if tx.ROLE_RANK[role] > tx.ROLE_RANK.get(member.role, 0):
        return [Reply(tx.INVITE_ROLE_TOO_HIGH.format(role=tx.ROLE_ZH.get(member.role, member.role)))]
    code = create_bind_code(session, unit_code, role)
    return [
        Reply(
            f"邀请码：{code}（{tx.ROLE_ZH[role]}，24小时内有效，只能使用一次）\n"
            f"请新同事在本群发送：/join {code}"
        )
    ]


# --------------------------------------------------------------------------- command line


def cli_bind(
    kind: str,
    code: str | None,
    role: str | None,
    *,
    ttl_hours: int = 24,
    sessions: sessionmaker[Session] | None = None,
    out=print,
) -> int:
    """``hotline bind unit CODE [--role R]`` / ``hotline bind center [--role R]``: print a one-time code.

    Returns the process exit code (0 ok, 2 bad input)."""
    if kind not in ("unit", "center"):
        print(
            "用法：hotline bind unit 单位代码 [--role handler|leader] 或 hotline bind center", file=sys.stderr
        )
        return 2
    unit_code = CENTER if kind == "center" else (code or "").strip()
    if not unit_code:
        print("请指定单位代码，例如：hotline bind unit chengguan", file=sys.stderr)
        return 2
    if unit_code == CENTER and kind == "unit":
        print("热线中心请使用：hotline bind center", file=sys.stderr)
        return 2
    role = (role or "").strip().lower()
    if unit_code == CENTER:
        role = {"": "operator", "handler": "operator", "leader": "supervisor"}.get(role, role)
    else:
        role = role or "handler"
    if sessions is None:
        from models.db import make_engine, make_session_factory

        sessions = make_session_factory(make_engine())
    try:
        with sessions.begin() as session:
            new = create_bind_code(session, unit_code, role, ttl_hours)
            unit_name = session.get(Unit, unit_code).name
    except BindError as err:
        print(str(err), file=sys.stderr)
        return 2
    out(f"绑定码：{new}")
    out(
        f"单位：{unit_name}（{unit_code}）  角色：{tx.ROLE_ZH[role]}（{role}）  {ttl_hours}小时内有效，只能使用一次。"
    )
    out(f"使用方法：把机器人拉进{unit_name}的工作群，由本人在群里发送：")
    out(f"  /bind {new}")
    out("（群已绑定时，同一命令会把发送人登记为该单位工作人员；也可发送 /join 绑定码。）")
    out("其他同事：由已登记的人员在群里发送 /invite 获取邀请码，新同事发送 /join 邀请码 即可。")
    return 0
