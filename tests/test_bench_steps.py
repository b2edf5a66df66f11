"""`hotline bench steps` plays whole conversations through the citizen step function and reports their cost."""

from __future__ import annotations

from bot.bench_steps import bench_steps
from tests.conftest import PG_URL


def test_bench_steps_plays_conversations_to_the_end_and_counts_each_kind_of_step():
    result = bench_steps(citizens=6, url=PG_URL if PG_URL.startswith("postgresql") else None)
    kinds = result["by_kind"]
    # every citizen writes two requests and answers the bot's questions with buttons until each is filed
    assert kinds["message"]["steps"] >= 12
    assert kinds["press"]["steps"] >= 6
    assert result["steps"] == sum(k["steps"] for k in kinds.values())
    assert result["sql_per_step"] > 1 and result["cpu_ms_per_step"] > 0
