"""The default unit catalog: DESIGN.md's 28 unit codes under the hotline center, each with a duty text
rich enough for routing (keywords and sentence embeddings) to tell the units apart."""

from __future__ import annotations

import re
from itertools import combinations
from pathlib import Path

import pytest
import yaml

CATALOG = Path(__file__).resolve().parents[1] / "models" / "catalog" / "units.yaml"

# DESIGN.md "Default unit catalog" — the codes are a contract.
DESIGN_UNITS = [
    ("chengguan", "城市管理局"),
    ("zhujian", "住房和城乡建设局"),
    ("shengtai", "生态环境局"),
    ("jiaotong", "交通运输局"),
    ("jiaoyu", "教育局"),
    ("renshe", "人力资源和社会保障局"),
    ("shichang", "市场监督管理局"),
    ("weijian", "卫生健康局"),
    ("gongan", "公安局"),
    ("minzheng", "民政局"),
    ("yibao", "医疗保障局"),
    ("ziranziyuan", "自然资源和规划局"),
    ("shuili", "水利局"),
    ("nongye", "农业农村局"),
    ("wenlv", "文化广电旅游体育局"),
    ("shuiwu", "税务局"),
    ("gongjijin", "住房公积金管理中心"),
    ("gongshui", "供水公司"),
    ("gongdian", "供电公司"),
    ("ranqi", "燃气公司"),
    ("tongxin", "通信运营商"),
    ("shenpi", "行政审批和政务服务局"),
    ("yingji", "应急管理局"),
    ("xiaofang", "消防救援大队"),
    ("shangwu", "商务局"),
    ("kejiju", "科学技术局"),
    ("youzheng", "邮政管理局"),
    ("jinrong", "金融工作局"),
]

# Words a citizen uses, and the one unit whose duties must name them.
CITIZEN_WORDS = {
    "占道经营": "chengguan",
    "违章搭建": "chengguan",
    "渣土车": "chengguan",
    "路灯": "chengguan",
    "物业": "zhujian",
    "延期交房": "zhujian",
    "偷排": "shengtai",
    "出租车": "jiaotong",
    "学籍": "jiaoyu",
    "拖欠工资": "renshe",
    "营业执照": "shichang",
    "非法行医": "weijian",
    "户口": "gongan",
    "身份证": "gongan",
    "出入境": "gongan",
    "居住证": "gongan",
    "社会生活噪声": "gongan",
    "养犬登记": "gongan",
    "低保": "minzheng",
    "异地就医": "yibao",
    "不动产": "ziranziyuan",
    "非法采砂": "shuili",
    "假种子": "nongye",
    "旅行社": "wenlv",
    "发票": "shuiwu",
    "公积金": "gongjijin",
    "水表": "gongshui",
    "停电": "gongdian",
    "燃气表": "ranqi",
    "宽带": "tongxin",
    "政务服务大厅": "shenpi",
    "烟花爆竹": "yingji",
    "消防通道": "xiaofang",
    "预付卡": "shangwu",
    "高新技术企业": "kejiju",
    "快递": "youzheng",
    "非法集资": "jinrong",
}


def _cjk(text: str) -> str:
    return "".join(re.findall(r"[\u4e00-\u9fff]", text))


@pytest.fixture(scope="module")
def units() -> list[dict]:
    with CATALOG.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def test_center_first_then_the_28_design_units(units):
    assert len(units) == 29
    center = units[0]
    assert (center["code"], center["name"], center["level"], center["parent"]) == (
        "center",
        "12345热线受理中心",
        1,
        None,
    )
    assert [(u["code"], u["name"]) for u in units[1:]] == DESIGN_UNITS
    for u in units[1:]:
        assert set(u) == {"code", "name", "level", "parent", "duties"}
        assert (u["level"], u["parent"]) == (2, "center"), u["code"]


def test_every_duty_text_is_substantial_and_distinct(units):
    texts = {u["code"]: u["duties"] for u in units}
    for code, text in texts.items():
        assert 150 <= len(_cjk(text)) <= 400, code
    assert len(set(texts.values())) == len(texts)
    bigrams = {
        code: {t[i : i + 2] for i in range(len(t) - 1)} for code, t in texts.items() for t in [_cjk(t)]
    }
    for a, b in combinations(bigrams, 2):
        overlap = len(bigrams[a] & bigrams[b]) / len(bigrams[a] | bigrams[b])
        assert overlap < 0.15, f"{a} and {b} duties are too alike ({overlap:.2f})"


@pytest.mark.parametrize("word,code", CITIZEN_WORDS.items())
def test_citizen_words_point_to_exactly_one_unit(units, word, code):
    holders = [u["code"] for u in units if word in u["duties"]]
    assert holders == [code]


def test_police_and_fire_carry_only_non_emergency_duties(units):
    by_code = {u["code"]: u["duties"] for u in units}
    assert "110" in by_code["gongan"] and "非紧急" in by_code["gongan"]
    assert "119" in by_code["xiaofang"] and "非紧急" in by_code["xiaofang"]


def test_catalog_loads_into_the_units_table(units, db):
    from models.tables import Unit

    with db() as session:
        for u in units:
            session.add(
                Unit(
                    code=u["code"],
                    name=u["name"],
                    level=u["level"],
                    parent_code=u["parent"],
                    duties=u["duties"],
                )
            )
        session.commit()
        stored = session.query(Unit).filter(Unit.parent_code == "center").count()
    assert stored == 28
