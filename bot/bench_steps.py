"""`hotline bench steps`: the CPU and SQL a citizen's conversation step costs, without Telegram or the model.

The load benchmark (`hotline bench e2e`) shows the whole stack, but its latencies vary ±20-30% from run to run on
a 2-core machine. This one plays the same citizens (bot/bench_e2e.py's messages and answers) straight into
``handle_citizen`` in one thread, with the rule-based stand-in triage, and reports what each kind of step costs
in process CPU time and SQL statements — numbers that move only when the code does, so a change to the step
path can be measured before the load benchmark is run.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bot.bench_e2e import Citizen, make_messages, prepare_database, stand_in_triage


def _incoming(update: dict[str, Any], message_id: int):
    from bot.messages import Incoming

    chat = str(update["chat_id"])
    base = {"channel": "telegram", "chat_id": chat, "user_id": chat}
    kind = update["kind"]
    if kind == "message":
        return Incoming(**base, text=update["text"])
    if kind == "press":
        return Incoming(**base, callback=update["data"], callback_message_id=message_id)
    if kind == "contact":
        return Incoming(
            **base, contact_name=update["name"], contact_phone=update["phone"], contact_user_id=chat
        )
    return Incoming(**base, latitude=update["lat"], longitude=update["lon"])


def _heard(replies) -> list[dict[str, Any]]:
    return [
        {"text": r.text, "buttons": [(b.label, b.data) for row in r.buttons for b in row], "message_id": 1}
        for r in replies
    ]


def bench_steps(citizens: int = 200, url: str | None = None, seed: int = 12345) -> dict:
    """Play ``citizens`` conversations (two requests each) step by step; CPU ms and SQL statements per step."""
    from sqlalchemy import event

    from bot.citizen import forget_units, handle_citizen
    from bot.services import Services
    from models.db import make_engine, make_session_factory
    from models.settings import get_settings

    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="hotline-bench-steps-"))
    db = prepare_database(url, workdir)
    engine = make_engine(db.url)
    statements = Counter()
    event.listen(engine, "before_cursor_execute", lambda *_a, **_k: statements.update(["sql"]))
    forget_units()
    services = Services(
        sessions=make_session_factory(engine),
        triage=stand_in_triage(get_settings().policy),
        policy_name="quxian",
    )
    cpu: dict[str, list[float]] = defaultdict(list)
    sql: dict[str, list[int]] = defaultdict(list)
    t0 = time.perf_counter()
    try:
        for i in range(citizens):
            person = Citizen(6_000_000 + i, make_messages(rng, 2), 0.0, random.Random(rng.random()))
            update = person.next_message()
            while update is not None:
                before_cpu, before_sql = time.process_time(), statements["sql"]
                replies = handle_citizen(services, _incoming(update, 1))
                cpu[update["kind"]].append((time.process_time() - before_cpu) * 1000)
                sql[update["kind"]].append(statements["sql"] - before_sql)
                person.heard = _heard(replies)
                update = person.decide() or person.next_message()
    finally:
        engine.dispose()
        if db.cleanup is not None:
            db.cleanup()
    steps = sum(len(v) for v in cpu.values())
    return {
        "database": db.kind,
        "citizens": citizens,
        "steps": steps,
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_ms_per_step": round(sum(sum(v) for v in cpu.values()) / steps, 2) if steps else None,
        "sql_per_step": round(sum(sum(v) for v in sql.values()) / steps, 2) if steps else None,
        "by_kind": {
            kind: {
                "steps": len(cpu[kind]),
                "cpu_ms_median": round(statistics.median(cpu[kind]), 2),
                "cpu_ms_mean": round(statistics.mean(cpu[kind]), 2),
                "sql_mean": round(statistics.mean(sql[kind]), 2),
            }
            for kind in sorted(cpu)
        },
    }


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(bench_steps(), ensure_ascii=False, indent=2))
