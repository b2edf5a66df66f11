"""Emergency cues added to screening: colloquial live emergencies are redirected to the right line, while
consultations, complaints, past events and prices that mention emergency words stay hotline tickets."""

from __future__ import annotations

import pytest

from models.policy import Policy, load_policy, preset_names
from triage.emergency_backstop import guard
from triage.screening import screen


@pytest.fixture(scope="module")
def policy() -> Policy:
    if "quxian" not in preset_names():
        pytest.skip("preset quxian not available")
    return load_policy("quxian")


@pytest.mark.parametrize(
    ("line", "text"),
    [
        # a burning thing + 着了, fire spreading
        ("119", "楼下超市的冰柜着了，烟往楼上窜"),
        ("119", "村头的草垛着了"),
        ("119", "客厅的空调外机着了，火顺着墙往上走"),
        ("119", "家里着了，我们跑出来了，奶奶还在二楼"),  # 跑出来了 is not "rescued, it is over"
        ("119", "有人开车冲进水库了，车在往下沉"),  # a sinking car needs water rescue
        # dialect fights, weapons held with a threat, extortion, confinement
        ("110", "两个醉汉在烧烤摊门口干架，桌子都掀了"),
        ("110", "邻居抄起一把锄头要劈我爸"),
        ("110", "他拎着钢管追着我弟跑"),
        ("110", "几个混混在学校门口让学生交保护费"),
        ("110", "我男朋友把我锁在出租屋里不让出门"),
        ("110", "有个男的拿着打火机站在加油站，说要点了这里"),
        ("110", "有个陌生人在我家门口转了半天，刚才在撬锁"),
        ("110", "有人正在地下车库里偷电瓶"),
        # a small child gone in a moment
        ("110", "我家娃在商场里玩，一眨眼就不见了"),
        # person states
        ("120", "有个大爷在公交站倒着，喊他也不回话"),
        ("120", "我爸打着牌突然倒下了"),
        ("120", "工人从梯子上摔下来，头上全是血"),
        ("120", "我哥喝了一瓶敌敌畏"),
        # vehicle + person
        ("122", "一辆铲车把扫地的阿姨压了"),
        ("122", "一辆轿车撞了老人以后开走了，老人趴在地上"),  # hit-and-run, not an aftermath
        ("122", "货车翻在弯道上，司机被压住了"),  # pinned by a vehicle: 122, not 119
        ("122", "我骑电动车被一辆小车顶飞了，腿动不了"),
    ],
)
def test_colloquial_live_emergencies_are_redirected_to_their_line(line, text, policy):
    res = screen(text, policy)
    assert res.verdict == "emergency", text
    assert res.emergency is not None and res.emergency.line == line, (text, res.emergency)


@pytest.mark.parametrize(
    "text",
    [
        # consultations and procedures about emergencies
        "请问煤气泄漏了应该怎么处理",
        "想了解一下孩子溺水了的急救方法",
        "想查一下上个月交通事故的处理进度",
        "我想咨询一下被家暴了怎么申请保护令",
        "车祸的赔偿款怎么算",
        "老人走失了去哪里登记",
        "家里的燃气灶火苗是黄色的，正常吗",
        # the police or an institution already has it; a complaint about the handling
        "我儿子被人打了，派出所做了笔录，让我们等鉴定结果",
        "孩子在学校被同学打了，学校也不处理",
        "家里被偷了，已经报过警了，想问监控谁来调",
        # past, over, hearsay, hypothetical, habitual
        "我以前被家暴过，现在想问孩子抚养权",
        "车祸受伤的家人已经出院了",
        "之前有个孩子从这个桥上掉下去过，护栏到现在还没修",
        "网上有人说要来小区闹事，是不是真的",
        "楼道里电瓶车乱停，着火了人都跑不出去",
        "小区池塘没有围栏，怕有人掉下去",
        "这个十字路口车祸好多",
        # prices, products, exhaust, lift manners, damaged cars
        "液化气涨到一罐一百三了",
        "买的高压锅质量不好，老是漏气，商家不给退",
        "小区里的挖掘机一开就冒黑烟",
        "电梯门关得太快，小孩子进不去",
        "电梯里有人抽烟，味道很难闻",
        "孕妇晕车了吃什么好",
        "我的车停在楼下被人撞了个坑，找不到是谁",
        "我的车停在小区里被别人撞了，车里没人",
        # a road hazard is an urgent ticket, not an emergency line
        "路灯杆旁边的电线掉下来了，很危险",
    ],
)
def test_consultations_complaints_and_past_events_are_not_emergencies(text, policy):
    res = screen(text, policy)
    assert res.verdict != "emergency", (text, res.emergency)


def test_a_call_for_help_keeps_a_question_an_emergency(policy):
    # "请问" or "咨询" does not silence a message that also calls for help now
    res = screen("我想咨询一下，楼下有人正在砸我家的门，快来", policy)
    assert res.verdict == "emergency" and res.emergency is not None and res.emergency.line == "110"


@pytest.mark.parametrize(
    ("line", "text"),
    [
        ("120", "我切菜的时候被菜刀切到手了，血止不住"),  # a kitchen cut is not an assault
        ("96333", "小区电梯把我们关在里面了，按铃没人应"),  # the lift locked us in: 96333, not 110
        ("96333", "电梯卡在两层之间，我在里面喘不上气"),  # entrapment first, as for fainting in a lift
    ],
)
def test_the_line_follows_the_situation(line, text, policy):
    res = screen(text, policy)
    assert res.verdict == "emergency" and res.emergency is not None and res.emergency.line == line, (
        text,
        res.emergency,
    )


def test_the_backstop_guard_knows_consultation_frames():
    assert guard("请问家里煤气泄漏了应该怎么处理") == "consult"
    assert guard("买的热水器质量不好，一直漏水，想退货") == "consult"
    assert guard("我家楼下着火了，快来") is None
