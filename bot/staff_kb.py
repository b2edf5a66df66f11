"""The /kb commands in unit and center groups: units maintain their own knowledge-base entries, the
center all of them. Called from ``bot.staff`` (moved out of bot/staff.py unchanged)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bot import staff_texts as tx
from bot.messages import Reply
from kb import store as kb_store
from models.catalog import CENTER
from models.knowledge import KB_STATUS_ZH

if TYPE_CHECKING:
    from bot.staff import GroupCtx


def editor_of(ctx: GroupCtx) -> kb_store.Editor:
    """渠县 第十三条 "谁提供、谁负责、谁更新": a unit edits its own entries; the center (第十四条) edits all."""
    if ctx.is_center:
        return kb_store.Editor.center(ctx.actor.label)
    return kb_store.Editor(who=ctx.actor.label, unit=ctx.unit_code)


def split_questions(text: str) -> list[str]:
    parts = [p.strip() for p in text.replace("；", "\n").replace(";", "\n").splitlines()]
    return [p for p in parts if p]


def kb_command(ctx: GroupCtx, args: str) -> list[Reply]:
    sub, _, rest = args.partition(" ")
    sub, rest = sub.strip().lower(), rest.strip()
    s = ctx.session
    editor = editor_of(ctx)
    if sub in ("", "list"):
        entries = kb_store.list_entries(s, unit=None if ctx.is_center else ctx.unit_code)
        if not entries:
            return [Reply("本单位还没有知识条目。发送 /kb add 新建。")]
        lines = [f"{'知识库' if ctx.is_center else ctx.unit.name + '的知识条目'}（共 {len(entries)} 条）："]
        for e in entries[:40]:
            q = e.questions[0] if e.questions else ""
            lines.append(f"· {e.id} [{KB_STATUS_ZH.get(e.status, e.status)}] {q[:30]}")
        if len(entries) > 40:
            lines.append(f"……另有 {len(entries) - 40} 条")
        return [Reply("\n".join(lines))]
    if sub == "add":
        if "|" in rest or "｜" in rest:
            parts = [p.strip() for p in rest.replace("｜", "|").split("|")]
            return kb_create(
                ctx, parts[0], parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else ""
            )
        ctx.st.start("kb_q")
        return [Reply("新建知识条目：请输入群众常问的问题（多种问法可用“；”分隔）：")]
    entry_id = rest.split()[0] if rest else ""
    if sub in ("edit", "retire", "publish") and not entry_id:
        return [Reply(f"请附上条目编号，例如：/kb {sub} kb-0001")]
    if sub == "edit":
        entry = kb_store.edit_entry(s, editor, entry_id)  # no change: checks it exists and is ours
        ctx.st.start("kb_edit", entry=entry.id)
        return [
            Reply(
                f"{entry.id}（{KB_STATUS_ZH.get(entry.status, entry.status)}）\n问题：{'；'.join(entry.questions)}\n"
                f"答复：{entry.answer}\n依据：{entry.basis or '—'}\n\n"
                "请发送要修改的内容，按行写“问题：…”“答复：…”“依据：…”（只写要改的行；直接发文字即替换答复）："
            )
        ]
    if sub == "retire":
        entry = kb_store.retire(s, editor, entry_id, note="群内停用")
        return [Reply(f"已停用知识条目 {entry.id}，不再用于答复群众。")]
    if sub == "publish":
        entry = kb_store.publish(s, editor, entry_id, note="群内发布")
        return [Reply(f"已发布知识条目 {entry.id}，将用于答复群众咨询。")]
    return [Reply("用法：/kb list｜/kb add｜/kb edit 编号｜/kb retire 编号｜/kb publish 编号")]


def kb_create(ctx: GroupCtx, questions: str, answer: str, basis: str) -> list[Reply]:
    basis = "" if tx.is_none_answer(basis or "无") else basis
    entry = kb_store.create_entry(
        ctx.session,
        editor_of(ctx),
        questions=split_questions(questions),
        answer=answer,
        basis=basis,
        unit=None if not ctx.is_center else CENTER,
        status="published" if basis else "draft",
        note="群内新建",
    )
    ctx.st.reset()
    if entry.status == "published":
        return [Reply(f"已新建并发布知识条目 {entry.id}，将用于答复群众咨询。")]
    return [
        Reply(
            f"已新建知识条目 {entry.id}（草稿）。没有答复依据的条目不能发布，补充依据后发送 /kb edit {entry.id}，"
            f"再发送 /kb publish {entry.id}。"
        )
    ]


def kb_text(ctx: GroupCtx, text: str) -> list[Reply]:
    state, d = ctx.st.state, ctx.st.data
    if state == "kb_q":
        d["questions"] = text
        ctx.st.state = "kb_a"
        return [Reply("请输入答复内容：")]
    if state == "kb_a":
        d["answer"] = text
        ctx.st.state = "kb_b"
        return [Reply("请输入答复依据（政策文件或规定名称和条款）；没有请回复“无”（将保存为草稿）：")]
    if state == "kb_b":
        return kb_create(ctx, d.get("questions", ""), d.get("answer", ""), text)
    if state == "kb_edit":
        changes: dict[str, object] = {}
        for key, value in tx.parse_kb_fields(text).items():
            changes[key] = split_questions(value) if key == "questions" else value
        entry = kb_store.edit_entry(ctx.session, editor_of(ctx), d["entry"], note="群内修改", **changes)
        ctx.st.reset()
        return [Reply(f"已更新知识条目 {entry.id}（第 {entry.version} 版）。")]
    ctx.st.reset()
    return []
