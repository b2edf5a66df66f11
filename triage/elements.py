"""The six elements (六要素) of a request — time, place, person, cause, process, result — as far as
they can be read off the citizen's own words. The bot asks only for what is missing (place, time)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PLACE_SUFFIX = (
    "小区|花园|家园|公寓|大厦|广场|公园|市场|超市|商场|学校|小学|中学|幼儿园|医院|卫生院|车站|路口|大道|大街|"
    "街道|街|路|巷|弄|村|组|社区|镇|乡|县|区|号楼|栋|单元|楼下|门口|附近|对面|旁边|工地|厂|桥|河|湖|站"
)
_PLACE = re.compile(
    r"(?:在|位于|住在|我家|我们)?([\u4e00-\u9fff0-9A-Za-z]{1,14}?(?:" + _PLACE_SUFFIX + r")"
    r"(?:[0-9一二三四五六七八九十]+(?:号|栋|单元|楼|组))*)"
)
_TIME = re.compile(
    r"(\d{1,4}年)?\d{1,2}月\d{1,2}[日号]|\d{1,2}[:：点]\d{0,2}|今天|昨天|前天|今早|今晚|昨晚|上午|下午|晚上|凌晨|"
    r"半夜|中午|早上|每天|天天|经常|一直|最近|近期|这几天|上周|上个月|本月|这个月|周[一二三四五六日末]|星期[一二三四五六日天]|"
    r"\d+(?:天|个月|年|周)(?:了|以来|多)"
)
_PERSON = re.compile(r"[\u4e00-\u9fff]{1,2}(?:先生|女士|师傅|阿姨|老板|经理|主任|书记|老师|医生|民警)")
_STOP_PLACE = {"我家", "我们", "这里", "那里", "附近", "门口", "楼下", "旁边", "对面", "区", "县", "路"}


@dataclass
class Elements:
    time: str | None = None
    place: str | None = None
    person: str | None = None
    cause: str | None = None
    process: str | None = None
    result: str | None = None

    def missing(self) -> list[str]:
        """What the bot should ask for: only place and time are asked (a citizen rarely knows the rest)."""
        return [k for k in ("place", "time") if not getattr(self, k)]


def extract_elements(text: str) -> Elements:
    text = text or ""
    place = None
    for m in _PLACE.finditer(text):
        cand = m.group(1).lstrip("在于住我们家的")
        if len(cand) >= 2 and cand not in _STOP_PLACE:
            place = cand
            break
    tm = _TIME.search(text)
    person = _PERSON.search(text)
    sentences = [s for s in re.split(r"[。！!？?\n]", text) if s.strip()]
    return Elements(
        time=tm.group(0) if tm else None,
        place=place,
        person=person.group(0) if person else None,
        cause=sentences[0][:200] if sentences else None,
        process="。".join(sentences[1:-1])[:500] or None if len(sentences) > 2 else None,
        result=sentences[-1][:200] if len(sentences) > 1 else None,
    )
