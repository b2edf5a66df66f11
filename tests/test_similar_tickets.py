"""Earlier tickets about the same event (triage/similar.py): repeat complaints and joining an open ticket."""

from __future__ import annotations

import numpy as np

from models.clock import now
from models.workflow import create_ticket, find_repeat
from tests.helpers import citizen
from triage.similar import (
    add_follower,
    find_similar,
    followers,
    join_candidates,
    repeat_candidates,
    same_issue,
    store_embedding,
)

LIGHT = "幸福小区3号楼门口的路灯坏了一个星期了，晚上黑漆漆的"
LIGHT_AGAIN = "幸福小区3号楼前面那盏路灯不亮了，晚上走路看不见"
PARKING = "幸福小区3号楼门口有人乱停车，堵住了消防通道"
PLACE = "幸福小区3号楼"


def _light_ticket(s, who):
    return create_ticket(s, text=LIGHT, citizen=who, policy="quxian", ev_place=PLACE)


def test_same_streetlight_from_two_citizens_is_found_and_can_be_joined(db, clock):
    with db.begin() as s:
        first = _light_ticket(s, citizen(s, "1001"))
        clock.advance(days=2)
        other = citizen(s, "2002")
        found = find_similar(s, LIGHT_AGAIN, None, other.id, PLACE, now())
        assert [c.ticket.id for c in found] == [first.id]
        hit = found[0]
        assert hit.same_place and not hit.same_citizen and hit.method == "words"
        assert hit.reasons == ["similar_wording", "same_place"]
        assert hit.reason_zh == "表述相似、同一地点"
        # the bot can offer "join the existing ticket" instead of a duplicate
        join = join_candidates(s, LIGHT_AGAIN, None, other.id, PLACE, now())
        assert [c.ticket.id for c in join] == [first.id]
        add_follower(s, first, other.id, LIGHT_AGAIN)
        add_follower(s, first, other.id, LIGHT_AGAIN)  # joining twice keeps one row
        assert followers(s, first) == [other.id]


def test_a_different_event_at_the_same_place_is_not_similar(db, clock):
    with db.begin() as s:
        _light_ticket(s, citizen(s, "1001"))
        clock.advance(hours=5)
        other = citizen(s, "2002")
        assert find_similar(s, PARKING, None, other.id, PLACE, now()) == []
        assert join_candidates(s, PARKING, None, other.id, PLACE, now()) == []


def test_another_building_is_not_the_same_place(db, clock):
    with db.begin() as s:
        _light_ticket(s, citizen(s, "1001"))
        clock.advance(days=1)
        other = citizen(s, "2002")
        text = "幸福小区5号楼前面那盏路灯不亮了，晚上走路看不见"
        found = find_similar(s, text, None, other.id, "幸福小区5号楼", now())
        assert all(not c.same_place for c in found)
        assert join_candidates(s, text, None, other.id, "幸福小区5号楼", now()) == []


def test_a_ticket_outside_the_window_is_not_found(db, clock):
    with db.begin() as s:
        _light_ticket(s, citizen(s, "1001"))
        clock.advance(days=31)
        other = citizen(s, "2002")
        assert find_similar(s, LIGHT_AGAIN, None, other.id, PLACE, now(), window_days=30) == []
        assert len(find_similar(s, LIGHT_AGAIN, None, other.id, PLACE, now(), window_days=60)) == 1


def test_the_same_citizen_raising_it_again_is_found_as_a_repeat_candidate(db, clock):
    with db.begin() as s:
        who = citizen(s, "1001")
        first = _light_ticket(s, who)
        create_ticket(s, text="我想咨询公积金贷款额度怎么算", citizen=who, policy="quxian")
        clock.advance(days=8)
        again = create_ticket(
            s, text="幸福小区3号楼门口那个路灯还是坏的，晚上黑乎乎的", citizen=who, policy="quxian"
        )
        found = repeat_candidates(s, again)
        assert [c.ticket.id for c in found] == [first.id]
        assert found[0].same_citizen and "same_citizen" in found[0].reasons
        # without a location the place is read from the text
        assert found[0].same_place


def test_same_issue_plugs_into_find_repeat(db, clock):
    assert same_issue(LIGHT, "幸福小区3号楼门口那个路灯还是坏的，晚上黑乎乎的")
    assert not same_issue(LIGHT, "我想咨询公积金贷款额度怎么算")
    with db.begin() as s:
        who = citizen(s, "1001")
        first = _light_ticket(s, who)
        clock.advance(days=7)  # quxian: unresolved after a while and raised again
        again = create_ticket(s, text=LIGHT_AGAIN, citizen=who, policy="quxian", ev_place=PLACE)
        assert find_repeat(s, again, same_issue=same_issue) is first  # raised again after 6 days unresolved


def test_stored_embeddings_are_used_when_the_message_has_one(db, clock):
    rng = np.random.default_rng(7)
    base = rng.normal(size=384).astype(np.float32)
    base /= np.linalg.norm(base)
    near = base + 0.01 * rng.normal(size=384).astype(np.float32)
    near /= np.linalg.norm(near)
    far = rng.normal(size=384).astype(np.float32)
    far /= np.linalg.norm(far)
    with db.begin() as s:
        a = create_ticket(
            s, text="和平街菜市场旁边的垃圾桶满了好几天没人清", citizen=citizen(s, "1"), policy="quxian"
        )
        b = create_ticket(s, text="和平街菜市场卖的肉缺斤短两", citizen=citizen(s, "2"), policy="quxian")
        store_embedding(s, a, near)
        store_embedding(s, b, far)
        store_embedding(s, b, far)  # replacing keeps one row
        clock.advance(hours=3)
        found = find_similar(
            s, "和平街菜场边上的垃圾没人收，堆成山了", base, citizen(s, "3").id, "和平街菜市场", now()
        )
        assert [c.ticket.id for c in found] == [a.id]
        assert found[0].method == "embedding" and found[0].wording > 0.9
