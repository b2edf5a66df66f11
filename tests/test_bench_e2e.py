"""`hotline bench e2e` itself: a small run through the real stack (the fake Bot API and a bot in processes of
their own; the rule-based triage so the bot starts in seconds) must find every update answered, every
confirmation one ticket and every outbox message delivered once, and must count what it was sent by kind."""

from __future__ import annotations

import pytest

from bot import texts
from bot.bench_e2e import STAGES, bench_e2e, python_loop_ms, superseded_confirms
from tests.conftest import PG_URL

URL = PG_URL if PG_URL.startswith("postgresql") else None


def _run(**kw):
    return bench_e2e(citizens=12, url=URL, faults=False, brain="stand-in", arrival_rate=6, duration_cap_s=60, **kw)


def _guarantees_hold(result: dict) -> None:
    assert result["guarantees"] == {
        "updates_lost": 0,
        "tickets_duplicated": 0,
        "tickets_missing": 0,
        "messages_lost": 0,
        "double_sends": 0,
        "double_sends_in_flight_at_kill": 0,
        "double_sends_other": 0,
        "rows_resent_after_unconfirmed_send": 0,
    }
    assert result["updates"]["lost"] == 0 and result["updates"]["still_queued"] == 0
    assert result["first_reply_whole_run"]["n"] == result["throughput"]["updates_total"]
    assert result["first_answer_whole_run"]["n"] == result["throughput"]["updates_total"]


def test_conversations_are_answered_to_the_end_and_every_confirmation_is_one_ticket():
    result = _run(messages_per_citizen=1)
    _guarantees_hold(result)
    # citizens answer the bot's questions and press its buttons: most of a conversation's updates are not texts
    assert result["tickets"]["confirmations"] >= 6
    assert result["tickets"]["created"] >= result["tickets"]["confirmations"]
    assert result["tickets"]["confirmed_content_not_last_message"] == 0  # nobody wrote before an answer came
    assert result["fake_server"]["calls"]["answerCallbackQuery"] >= result["tickets"]["confirmations"]
    assert result["updates"]["answered"] > 12 * 2
    # the report says where the first replies of the clean stretch waited, stage by stage
    stages = result["first_reply_stages_clean"]
    assert stages["n"] > 0
    for name in STAGES:
        assert 0 <= stages[name]["p50_ms"] <= stages[name]["p95_ms"]
    assert stages["step"]["p50_ms"] > 0  # a step reads and writes the database: never free
    whole = sum(stages[name]["mean_ms"] for name in STAGES)
    assert whole <= result["first_reply_clean"]["max_ms"]  # inside the bot, within what the citizen waited
    # and what an update cost each process, comparable between machines: the bot's Python is never free
    cost = result["per_update_clean"]
    assert set(cost["cpu_ms"]) == {"bot", "triage", "postgres", "fake_api", "driver"}
    assert cost["cpu_ms"]["bot"] > 0 and all(v >= 0 for v in cost["cpu_ms"].values())
    assert 0 < cost["cores_in_use"]


def test_a_flood_sends_only_text_messages_and_each_gets_an_answer():
    result = _run(messages_per_citizen=2, mix="flood")
    _guarantees_hold(result)
    assert result["throughput"]["updates_total"] == 12 * 2
    assert result["tickets"] == {
        "created": 0,
        "confirmations": 0,
        "duplicated": 0,
        "missing": 0,
        "confirmed_content_not_last_message": 0,
    }
    assert "answerCallbackQuery" not in result["fake_server"]["calls"]


def test_an_unknown_mix_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="conversations, flood"):
        bench_e2e(citizens=1, mix="everyone-at-once")


def test_a_confirmation_that_filed_before_a_later_message_was_added_is_still_expected():
    def summary(token, note=""):
        return {"chat_id": "7", "text": f"{note}请确认您的诉求：…", "buttons": [["✅ 确认提交", f"d:ok:{token}"]]}

    sent = [
        summary("a1"),
        {"chat_id": "7", "text": "✅ 已受理，工单号 20261203-000001", "buttons": []},
        summary("b1"),
        summary("b2", note=texts.TEXT_ADDED + "\n"),
        summary("x1") | {"chat_id": "8"},  # another chat's draft is not touched
    ]
    assert superseded_confirms(sent) == {("7", "d:ok:b1")}


def test_the_machine_speed_reading_grows_with_the_work_it_times():
    # the report's yardstick for comparing runs on a shared machine: eight times the loop reads slower
    assert python_loop_ms(400_000) > python_loop_ms(50_000) > 0
