"""Screening before classification: emergencies, exclusions (不予受理) and urgent incidents.

Three questions, asked in this order by :func:`screen`:

1. :func:`detect_emergency` — is something happening *now* that belongs to an emergency line
   (110 / 119 / 120 / 122 / 96333)? Every seed regulation keeps those out of the hotline
   (平政办发〔2018〕111号 第七条（二）; 宿政办发〔2020〕55号 第七条（五）; 渠府办〔2023〕66号 第八条（三）;
   大政发〔2015〕30号 第十二条（二）、第十七条). Recall first: when the time is unknown it is taken as now;
   only explicit past, habit, risk, negation, resolution or administration words turn a match off.
2. :func:`detect_exclusion` — is it a kind of request the active policy does not accept?
3. :func:`detect_urgent` — accepted, but on the policy's hours-scale track (渠府办〔2023〕66号 第十一条（四）;
   平政办发〔2018〕111号 第二十二条).

All phrases live in ``triage/data/screening_rules.yaml`` and are compiled once. Pure Python, well under
a millisecond per message.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

from models.clock import get_clock
from models.policy import Exclusion, Policy

RULES_PATH = Path(__file__).parent / "data" / "screening_rules.yaml"
EVAL_PATH = Path(__file__).parent / "data" / "screening_eval.jsonl"

EmergencyLine = Literal["110", "119", "120", "122", "96333"]
Verdict = Literal["emergency", "reject", "accept"]


@dataclass(frozen=True)
class Emergency:
    """Redirect the citizen at once to ``line``; ``matched`` is the phrase that triggered it."""

    line: EmergencyLine
    label_zh: str
    matched: str


@dataclass(frozen=True)
class ScreenResult:
    verdict: Verdict
    emergency: Emergency | None = None
    exclusion: Exclusion | None = None
    urgent_level: str | None = None  # a key of policy.urgent, only when verdict == "accept"
    exclusion_key: str | None = None  # the fine-grained key detected (may differ from exclusion.key)


# ------------------------------------------------------------------------------------- text helpers

_SENTENCE_END = "。!?；;\n"
_CLAUSE_END = _SENTENCE_END + ",，、 ~～…:："
_CJK = re.compile(r"[\u3400-\u9fff]")
_TIME_FILLER = re.compile(
    r"[0-9一二三四五六七八九十两几]+|[点分号日月周年天]|星期|礼拜|[早中晚]上|上午|下午|凌晨|半夜|夜里|傍晚|左右|"
    r"的时候|时候|那天|[冬夏春秋]天|过年|春节|期间|大概|大约|差不多|我们|我家|在|的|了|时"
)


def normalise(text: str) -> str:
    """NFKC (full-width → half-width), lower case, runs of whitespace → one space."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text or "")).strip().lower()


def _spans(text: str, enders: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for i, ch in enumerate(text):
        if ch in enders:
            spans.append((start, i + 1))
            start = i + 1
    spans.append((start, len(text)))
    return spans


def _span_at(spans: list[tuple[int, int]], pos: int) -> tuple[int, int]:
    for a, b in spans:
        if a <= pos < b:
            return a, b
    return spans[-1]


# ------------------------------------------------------------------------------------- rule loading


def _expand(pattern: str, macros: dict[str, str]) -> str:
    for _ in range(4):  # macros may use macros
        new = re.sub(r"%([A-Z_]+)%", lambda m: macros[m.group(1)], pattern)
        if new == pattern:
            break
        pattern = new
    return pattern


def _alt(items: list[str] | str | None, macros: dict[str, str]) -> re.Pattern[str] | None:
    if not items:
        return None
    if isinstance(items, str):
        items = [items]
    return re.compile("|".join(f"(?:{_expand(p, macros)})" for p in items))


@dataclass(frozen=True)
class _EmergencyRule:
    id: str
    line: str
    label_zh: str
    pattern: re.Pattern[str]
    false_friends: re.Pattern[str] | None
    context_unless: re.Pattern[str] | None
    context_scope: str  # clause | sentence | text
    no_injury: re.Pattern[str] | None
    aftermath_extra: re.Pattern[str] | None
    intent: bool
    weak: bool


@dataclass(frozen=True)
class _KeyRule:
    key: str
    patterns: re.Pattern[str] | None
    unless: re.Pattern[str] | None
    requires: re.Pattern[str] | None
    consult_ok: bool
    fallback: tuple[str, ...]
    min_years_ago: int | None


@dataclass(frozen=True)
class _UrgentRule:
    id: str
    level: str
    pattern: re.Pattern[str]
    requires: re.Pattern[str] | None
    unless: re.Pattern[str] | None


@dataclass(frozen=True)
class _Rules:
    lines: dict[str, str]
    priority: tuple[str, ...]
    emergency: tuple[_EmergencyRule, ...]
    past: re.Pattern[str]
    present: re.Pattern[str]
    ongoing: re.Pattern[str]
    past_aspect: re.Pattern[str]
    past_aspect_before: re.Pattern[str]
    resolved: re.Pattern[str]
    habitual: re.Pattern[str]
    narrative_min: int
    urgency: re.Pattern[str]
    hypothetical: re.Pattern[str]
    hypothetical_after: re.Pattern[str]
    future: re.Pattern[str]
    negation_before: re.Pattern[str]
    aftermath_after: re.Pattern[str]
    admin_context: re.Pattern[str]
    consultation: re.Pattern[str]
    help_words: re.Pattern[str]
    education_context: re.Pattern[str]
    weak_hints: tuple[tuple[str, re.Pattern[str]], ...]
    backstop_needs: dict[str, tuple[re.Pattern[str], ...]]
    exclusion_order: tuple[str, ...]
    keys: dict[str, _KeyRule]
    how_to: re.Pattern[str]
    long_text_chars: int
    head_chars: int
    fillers: re.Pattern[str]
    insults: re.Pattern[str]
    harassment: re.Pattern[str]
    rest_fillers: re.Pattern[str]
    max_rest_chars: int
    ooj: dict[str, Any]
    places: dict[str, Any]
    urgent: tuple[_UrgentRule, ...]
    urgent_resolved: re.Pattern[str]
    level_fallback: dict[str, tuple[str, ...]]


@lru_cache(maxsize=4)
def load_rules(path: str | Path = RULES_PATH) -> _Rules:
    """Read and compile the rule file once per process."""
    with Path(path).open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    macros: dict[str, str] = data["macros"]
    em = data["emergency"]

    def rx(items: Any) -> re.Pattern[str]:
        compiled = _alt(items, macros)
        assert compiled is not None, items
        return compiled

    rules = tuple(
        _EmergencyRule(
            id=r["id"],
            line=str(r["line"]),
            label_zh=r["label_zh"],
            pattern=rx(r["patterns"]),
            false_friends=_alt(r.get("false_friends"), macros),
            context_unless=_alt(r.get("context_unless"), macros),
            context_scope=r.get("context_scope", "clause"),
            no_injury=_alt(r.get("no_injury"), macros),
            aftermath_extra=_alt(r.get("aftermath_after_extra"), macros),
            intent=bool(r.get("intent", False)),
            weak=bool(r.get("weak", False)),
        )
        for r in em["rules"]
    )
    ex = data["exclusion"]
    keys = {
        key: _KeyRule(
            key=key,
            patterns=_alt(spec.get("patterns"), macros),
            unless=_alt(spec.get("unless"), macros),
            requires=_alt(spec.get("requires"), macros),
            consult_ok=bool(spec.get("consult_ok", False)),
            fallback=tuple(spec.get("fallback", [])),
            min_years_ago=spec.get("min_years_ago"),
        )
        for key, spec in ex["keys"].items()
    }
    abuse, no_content = ex["keys"]["abuse"], ex["keys"]["no_content"]
    urg = data["urgent"]
    urgent = tuple(
        _UrgentRule(
            id=r["id"],
            level=r["level"],
            pattern=rx(r["patterns"]),
            requires=_alt(r.get("requires"), macros),
            unless=_alt(r.get("unless"), macros),
        )
        for r in urg["rules"]
    )
    return _Rules(
        lines={str(k): v for k, v in em["lines"].items()},
        priority=tuple(str(p) for p in em["priority"]),
        emergency=rules,
        past=rx(em["past_markers"]),
        present=rx(em["present_markers"]),
        ongoing=rx(em["ongoing_markers"]),
        past_aspect=rx(em["past_aspect"]),
        past_aspect_before=re.compile(r"(?:发生|出|有|遭遇|遭|经历|闹|着|起|失|困|关|打|被.{0,2})过了?$"),
        resolved=rx(em["resolved_markers"]),
        habitual=rx(em["habitual_markers"]),
        narrative_min=int(em["narrative"]["min_chars"]),
        urgency=rx(em["narrative"]["urgency"]),
        hypothetical=rx(em["hypothetical_markers"]),
        hypothetical_after=rx(em["hypothetical_after"]),
        future=rx(em["future_markers"]),
        negation_before=rx(em["negation_before"]),
        aftermath_after=rx(em["aftermath_after"]),
        admin_context=rx(em["admin_context"]),
        consultation=rx(em["consultation_frames"]),
        help_words=rx(em["help_words"]),
        education_context=rx(em["education_context"]),
        weak_hints=tuple((str(k), rx(v)) for k, v in em["weak_line_hints"].items()),
        backstop_needs={str(k): tuple(rx(p) for p in v) for k, v in em["backstop_line_needs"].items()},
        exclusion_order=tuple(ex["order"]),
        keys=keys,
        how_to=rx(ex["how_to"]),
        long_text_chars=int(ex["long_text_chars"]),
        head_chars=int(ex["head_chars"]),
        fillers=rx(no_content["fillers"]),
        insults=rx(abuse["insults"]),
        harassment=rx(abuse["harassment"]),
        rest_fillers=rx(abuse["rest_fillers"]),
        max_rest_chars=int(abuse["max_rest_chars"]),
        ooj=ex["keys"]["out_of_jurisdiction"],
        places=data["places"],
        urgent=urgent,
        urgent_resolved=rx(urg["resolved_markers"]),
        level_fallback={k: tuple(v) for k, v in urg["level_fallback"].items()},
    )


# ------------------------------------------------------------------------------------- time context


class _Context:
    """Clause/sentence geometry and the time questions shared by emergencies and urgent incidents."""

    def __init__(self, text: str, rules: _Rules) -> None:
        self.text = text
        self.r = rules
        self.clauses = _spans(text, _CLAUSE_END)
        self.sentences = _spans(text, _SENTENCE_END)

    def clause(self, pos: int) -> tuple[int, int]:
        return _span_at(self.clauses, pos)

    def sentence(self, pos: int) -> tuple[int, int]:
        return _span_at(self.sentences, pos)

    def _marker_before(self, start: int, end: int) -> str | None:
        """The kind ("past"/"present") of the last time marker in text[start:end]."""
        best, kind = -1, None
        for name, rx in (("past", self.r.past), ("present", self.r.present)):
            for m in rx.finditer(self.text, start, end):
                if m.start() > best:
                    best, kind = m.start(), name
        return kind

    def is_past(self, s: int, e: int) -> bool:
        """The event at text[s:e] happened before now (and is not said to go on)."""
        t = self.text
        c0, _ = self.clause(s)
        # 着过火, 关过人, 发生过火灾, 被困过
        if self.r.past_aspect.search(t, s, min(len(t), e + 4)):
            return True
        if self.r.past_aspect_before.search(t[max(c0, s - 5) : s]):
            return True
        kind = self._marker_before(c0, e)  # a marker inside the match counts: "孩子以前走丢"
        if kind is None:
            # a pure time adverbial in the clauses just before ("上周五晚上8点左右，我们楼着火了")
            idx = next(i for i, span in enumerate(self.clauses) if span[0] == c0)
            for a, b in reversed(self.clauses[max(0, idx - 2) : idx]):
                seg = t[a:b]
                k = self._marker_before(a, b)
                if k is None:
                    continue
                rest = _TIME_FILLER.sub("", self.r.past.sub("", self.r.present.sub("", seg)))
                if len(_CJK.findall(rest)) <= 3:
                    kind = k
                break
        if kind != "past":
            return False
        # "昨天开始冒烟，现在还在冒": an ongoing state after the match keeps it in the present
        _, s1 = self.sentence(s)
        return not self.r.ongoing.search(t, e, s1)

    def is_resolved(self, e: int, resolved: re.Pattern[str]) -> bool:
        """The rest of this sentence and the next one say it is over ("已经灭了", "孩子找到了")."""
        _, s1 = self.sentence(e - 1 if e else 0)
        _, s2 = self.sentence(s1) if s1 < len(self.text) else (s1, s1)
        return bool(resolved.search(self.text, e, max(s1, s2)))


# ------------------------------------------------------------------------------------- emergencies


def _habitual(ctx: _Context, s0: int, s1: int, e: int) -> bool:
    """A frequency word earlier in the sentence ("经常有人打架") that no "now" word follows before the
    match, and no ongoing state after it ("…，现在又在打")."""
    r, t = ctx.r, ctx.text
    last = max((m.end() for m in r.habitual.finditer(t, s0, e)), default=-1)
    if last < 0:
        _, c1 = ctx.clause(e - 1)
        if not r.habitual.search(t, e, c1):  # "这个路口车祸太多了"
            return False
        last = s0
    if any(True for _ in r.present.finditer(t, last, e)):
        return False
    return not r.ongoing.search(t, e, s1)


def _emergency_hit(ctx: _Context, rule: _EmergencyRule, m: re.Match[str]) -> bool:
    r, t = ctx.r, ctx.text
    s, e = m.span()
    if rule.false_friends is not None:
        for f in rule.false_friends.finditer(t, max(0, s - 10), min(len(t), e + 10)):
            if f.start() < e and f.end() > s:
                return False
    c0, c1 = ctx.clause(s)
    clause = t[c0:c1]
    s0, s1 = ctx.sentence(s)
    scope = {"clause": clause, "sentence": t[s0:s1], "text": t}[rule.context_scope]
    if rule.context_unless is not None and rule.context_unless.search(scope):
        return False
    if r.admin_context.search(clause) or r.education_context.search(t):
        return False
    if r.negation_before.search(t[max(c0, s - 6) : s]):
        return False
    # a risk word before or inside the match ("怕引起火灾", "车差点掉进去")
    if any(True for _ in r.hypothetical.finditer(t, c0, e)) or r.hypothetical_after.match(t, e):
        return False
    if r.aftermath_after.match(t, e) or (rule.aftermath_extra and rule.aftermath_extra.match(t, e)):
        return False
    if _habitual(ctx, s0, s1, e):
        return False
    if not rule.intent and r.future.search(t, s0, s) and not r.present.search(t, s0, s1):
        return False
    if ctx.is_past(s, e):
        return False
    if len(t) >= r.narrative_min:
        a = ctx.clause(c0 - 1)[0] if c0 > 0 else c0
        b = ctx.clause(c1)[1] if c1 < len(t) else c1
        if not r.urgency.search(t, min(a, s0), max(b, s1)):
            return False
    if ctx.is_resolved(e, r.resolved):
        return False
    return not (rule.no_injury is not None and rule.no_injury.search(t))


def detect_emergency(text: str) -> Emergency | None:
    """The emergency line the citizen must call now, or None.

    >>> detect_emergency("楼下着火了，烟好大").line
    '119'
    >>> detect_emergency("上周着过火，消防通道还堵着") is None
    True
    """
    r = load_rules()
    t = normalise(text)
    if not t:
        return None
    if r.consultation.search(t) and not r.help_words.search(t):
        return None  # asking about a procedure or complaining about its handling, nobody calling for help
    ctx = _Context(t, r)
    hits: list[tuple[int, int, _EmergencyRule, str]] = []
    for rule in r.emergency:
        pos = 0
        # a rejected match is retried one character later, not after its end: "车撞了学生以后掉头跑了" is
        # rejected as "车撞了…以后" (an aftermath) but found as "撞了学生以后掉头跑" (a hit-and-run)
        while (m := rule.pattern.search(t, pos)) is not None:
            if m.group(0) and _emergency_hit(ctx, rule, m):
                hits.append((1 if rule.weak else 0, r.priority.index(rule.line), rule, m.group(0)))
                break
            pos = m.start() + 1
    if not hits:
        return None
    weak, _, rule, matched = min(hits, key=lambda h: (h[0], h[1]))
    if weak:  # a bare cry for help: the line its words point to
        line = next((ln for ln, hint in r.weak_hints if hint.search(t)), rule.line)
        return Emergency(line=line, label_zh=r.lines[line], matched=matched)  # type: ignore[arg-type]
    return Emergency(line=rule.line, label_zh=rule.label_zh, matched=matched)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- exclusions


def _no_content(t: str, r: _Rules) -> str | None:
    kept = "".join(ch for ch in t if ch.isalnum())
    if not kept:
        return t[:20] or "(空)"
    rest = r.fillers.sub("", kept)
    if not rest:
        return kept[:20]
    if not _CJK.search(kept) and (kept.isdigit() or (" " not in t.strip() and len(kept) <= 12)):
        return kept[:20]  # "asdfgh", "1111"; a sentence in English is left to the classifier
    return None


def _abuse(t: str, r: _Rules) -> str | None:
    found = r.insults.search(t) or r.harassment.search(t)
    if not found:
        return None
    rest = r.harassment.sub("", r.insults.sub("", t))
    rest = r.fillers.sub("", r.rest_fillers.sub("", rest))
    if len(_CJK.findall(rest)) <= r.max_rest_chars:
        return found.group(0)
    return None


@dataclass(frozen=True)
class _PlaceMatcher:
    inside: tuple[str, ...]
    places: re.Pattern[str] | None
    transfer: re.Pattern[str]
    not_after: re.Pattern[str]
    suffix: re.Pattern[str]


@lru_cache(maxsize=32)
def _place_matcher(jurisdiction: str) -> _PlaceMatcher:
    """Compile, once per jurisdiction, the names that lie outside it (平政办发〔2018〕111号 第七条（一）)."""
    r = load_rules()
    spec, places = r.ooj, r.places
    known = next((v for k, v in places["jurisdictions"].items() if k in jurisdiction), None) or {}
    base = re.sub(r"(?:市|县|区|自治县)$", "", jurisdiction) or jurisdiction
    inside = tuple(n for n in {jurisdiction, base, *known.get("inside", [])} if n)
    parents = set(known.get("parents", []))
    siblings = set(known.get("siblings", []))
    cities: dict[str, str] = places["cities"]
    own_province = next((p for p in parents if p in places["provinces"]), cities.get(base))
    outside = []
    for p in set(places["provinces"]) | set(cities) | siblings:
        if p in parents or any(p in n or n in p for n in inside):
            continue
        province = p if p in places["provinces"] else cities.get(p)
        if p in siblings or p in cities or own_province is None or province != own_province:
            outside.append(p)
    suffix, loc, follow = spec["admin_suffix"], spec["locative"], spec["clause_start_follow"]
    rx = None
    if outside:
        names = "|".join(sorted(map(re.escape, outside), key=len, reverse=True))
        rx = re.compile(
            rf"(?:{loc})({names})|({names}){suffix}"
            rf"|(?:^|[,，。!?;；\s])({names})(?=[\u4e00-\u9fff]{{0,4}}(?:{follow}))"
        )
    return _PlaceMatcher(
        inside=inside,
        places=rx,
        transfer=re.compile(spec["transfer_cues"]),
        not_after=re.compile(spec["not_after"]),
        suffix=re.compile(rf"{suffix}(?:民|人|户口|籍)"),
    )


def _out_of_jurisdiction(t: str, r: _Rules, jurisdiction: str) -> str | None:
    """A place outside the jurisdiction named as where the matter happens, or None."""
    pm = _place_matcher(jurisdiction)
    if pm.places is None or pm.transfer.search(t) or any(name in t for name in pm.inside):
        return None
    hits = []
    for m in pm.places.finditer(t):
        group = next(i for i in (1, 2, 3) if m.group(i))
        end = m.start(group) + len(m.group(group))
        if pm.not_after.match(t, end) or pm.suffix.match(t, end):  # 北京路, 河南人, 上海市民
            continue
        hits.append(m)
    if not hits or (len(t) > r.long_text_chars and hits[0].start() >= r.head_chars and len(hits) < 2):
        return None
    first = hits[0]
    return first.group(next(i for i in (1, 2, 3) if first.group(i)))


def _key_match(t: str, kr: _KeyRule, r: _Rules) -> re.Match[str] | None:
    if kr.patterns is None:
        return None
    hits = list(kr.patterns.finditer(t))
    if kr.min_years_ago is not None:
        this_year = get_clock().now().year
        hits = [
            m
            for m in hits
            if not m.groupdict().get("year") or int(m.group("year")) <= this_year - kr.min_years_ago
        ]
    if not hits:
        return None
    if len(t) > r.long_text_chars and hits[0].start() >= r.head_chars and len(hits) < 2:
        return None  # a passing mention deep inside a long message
    return hits[0]


def _detect_keys(t: str, jurisdiction: str | None) -> Iterator[tuple[str, str]]:
    """Each exclusion key the text shows, lazily, in the rule file's order, with the phrase matched."""
    r = load_rules()
    for key in r.exclusion_order:
        matched: str | None = None
        if key == "no_content":
            matched = _no_content(t, r)
        elif key == "abuse":
            matched = _abuse(t, r)
        elif key == "out_of_jurisdiction":
            matched = _out_of_jurisdiction(t, r, jurisdiction) if jurisdiction else None
        else:
            kr = r.keys[key]
            m = _key_match(t, kr, r)
            if m is None:
                continue
            if kr.unless is not None and kr.unless.search(t):
                continue
            if kr.requires is not None and not kr.requires.search(t):
                continue
            if kr.consult_ok and r.how_to.search(t):
                continue
            matched = m.group(0)
        if matched:
            yield key, matched


def policy_exclusion(policy: Policy, key: str) -> Exclusion | None:
    """The policy's exclusion for a detected key: the key itself (or its reason), then its fallbacks."""
    ex = policy.exclusion(key)
    if ex is not None:
        return ex
    rule = load_rules().keys.get(key)
    for fb in rule.fallback if rule else ():
        ex = policy.exclusion(fb)
        if ex is not None:
            return ex
    return None


def _exclusion_with_key(text: str, policy: Policy) -> tuple[str, Exclusion] | None:
    t = normalise(text)
    for key, _matched in _detect_keys(t, policy.jurisdiction):
        ex = policy_exclusion(policy, key)
        if ex is not None:
            return key, ex
    return None


def detect_exclusion(text: str, policy: Policy) -> Exclusion | None:
    """The policy's exclusion (不予受理) that applies to the message, or None.

    A key the active policy does not list is not rejected (宿迁 accepts discipline reports, only 大连
    rejects cases older than two years, ...).
    """
    found = _exclusion_with_key(text, policy)
    return found[1] if found else None


# ------------------------------------------------------------------------------------- urgent


def detect_urgent(text: str) -> str | None:
    """The urgent level ("special_urgent" or "special") of an accepted message, or None."""
    r = load_rules()
    t = normalise(text)
    if not t:
        return None
    ctx = _Context(t, r)
    levels = set()
    for rule in r.urgent:
        for m in rule.pattern.finditer(t):
            s, e = m.span()
            s0, s1 = ctx.sentence(s)
            sentence = t[s0:s1]
            if rule.requires is not None and not rule.requires.search(sentence):
                continue
            if rule.unless is not None and rule.unless.search(sentence):
                continue
            if r.negation_before.search(t[max(s0, s - 6) : s]):
                continue
            if ctx.is_past(s, e) or ctx.is_resolved(e, r.urgent_resolved):
                continue
            if _habitual(ctx, s0, s1, e):  # a chronic problem ("三天两头停水") is a normal ticket
                continue
            levels.add(rule.level)
            break
    for level in ("special_urgent", "special"):
        if level in levels:
            return level
    return None


def policy_urgent_level(policy: Policy, level: str | None) -> str | None:
    """Map a detected level onto the levels the policy defines (平利/宿迁 have one, 渠县 two)."""
    if level is None:
        return None
    for candidate in load_rules().level_fallback.get(level, (level,)):
        if candidate in policy.urgent:
            return candidate
    return None


# ------------------------------------------------------------------------------------- screen


def screen(text: str, policy: Policy) -> ScreenResult:
    """Emergency first, then exclusion, then urgent."""
    emergency = detect_emergency(text)
    if emergency is not None:
        return ScreenResult(verdict="emergency", emergency=emergency)
    found = _exclusion_with_key(text, policy)
    if found is not None:
        return ScreenResult(verdict="reject", exclusion=found[1], exclusion_key=found[0])
    return ScreenResult(verdict="accept", urgent_level=policy_urgent_level(policy, detect_urgent(text)))


# ------------------------------------------------------------------------------------- evaluation


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _metrics(items: list[dict], results: list[ScreenResult], policy: Policy) -> dict:
    em_total = em_hit = line_ok = 0
    non_em = false_alarm = 0
    urg_exp = urg_hit = urg_pred = urg_tp = urg_level_ok = 0
    verdict_ok = 0
    key_tp: Counter[str] = Counter()
    key_fp: Counter[str] = Counter()
    key_fn: Counter[str] = Counter()
    rej_exp = rej_pred = rej_tp = 0
    skipped: Counter[str] = Counter()
    for item, res in zip(items, results, strict=True):
        expect, key = item["expect"], item.get("key")
        if expect == "reject" and key and policy_exclusion(policy, key) is None:
            skipped[key] += 1
            expect, key = "accept", None  # this policy accepts such requests
        verdict_ok += res.verdict == expect
        if expect == "emergency":
            em_total += 1
            if res.verdict == "emergency":
                em_hit += 1
                line_ok += bool(res.emergency and res.emergency.line == item.get("line"))
        else:
            non_em += 1
            false_alarm += res.verdict == "emergency"
        if expect == "reject":
            rej_exp += 1
            if key:
                if res.exclusion_key == key:
                    key_tp[key] += 1
                else:
                    key_fn[key] += 1
        if res.verdict == "reject":
            rej_pred += 1
            rej_tp += expect == "reject"
            if res.exclusion_key and res.exclusion_key != key:
                key_fp[res.exclusion_key] += 1
        want_urgent = item.get("urgent")
        got_urgent = detect_urgent(item["text"]) if res.verdict == "accept" else None
        if expect == "accept" and want_urgent:
            urg_exp += 1
            urg_hit += bool(got_urgent)
            urg_level_ok += got_urgent == want_urgent
        if got_urgent:
            urg_pred += 1
            urg_tp += bool(want_urgent) and expect == "accept"
    per_key = {}
    for k in sorted(set(key_tp) | set(key_fp) | set(key_fn)):
        per_key[k] = {
            "precision": _ratio(key_tp[k], key_tp[k] + key_fp[k]),
            "recall": _ratio(key_tp[k], key_tp[k] + key_fn[k]),
            "support": key_tp[k] + key_fn[k],
        }
    return {
        "n": len(items),
        "verdict_accuracy": _ratio(verdict_ok, len(items)),
        "emergency_recall": _ratio(em_hit, em_total),
        "emergency_line_accuracy": _ratio(line_ok, em_hit),
        "emergencies": em_total,
        "false_alarm_rate": _ratio(false_alarm, non_em),
        "false_alarms": false_alarm,
        "non_emergencies": non_em,
        "reject_precision": _ratio(rej_tp, rej_pred),
        "reject_recall": _ratio(rej_tp, rej_exp),
        "reject_per_key": per_key,
        "urgent_recall": _ratio(urg_hit, urg_exp),
        "urgent_level_accuracy": _ratio(urg_level_ok, urg_exp),
        "urgent_precision": _ratio(urg_tp, urg_pred),
        "keys_not_excluded_by_policy": dict(skipped),
    }


def all_keys_policy(base: Policy) -> Policy:
    """``base`` plus a generic exclusion for every key of the rule file it lacks: measures the rules
    on their own, whatever a preset chooses to exclude."""
    with RULES_PATH.open(encoding="utf-8") as fh:
        reasons: dict[str, str] = yaml.safe_load(fh)["exclusion"]["reasons"]
    have = {ex.key for ex in base.exclusions}
    extra = [
        Exclusion(key=k, reason=reason, wording=f"（测试）{k}", go_to="（测试）", cite="screening_rules.yaml")
        for k, reason in reasons.items()
        if k not in have
    ]
    return base.model_copy(update={"exclusions": [*base.exclusions, *extra]})


def load_eval(path: str | Path = EVAL_PATH) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def evaluate_screening(path: str | Path, policy: Policy) -> dict:
    """Measure screening on a JSON-lines set of {"text", "expect", "line", "key", "urgent"}.

    Items expected to be rejected under a key the policy does not exclude count as "accept".
    Returns overall metrics, the same per "half" when items carry one, and the errors.
    """
    items = load_eval(path)
    results = [screen(item["text"], policy) for item in items]
    report = _metrics(items, results, policy)
    halves = sorted({item["half"] for item in items if item.get("half")})
    if halves:
        report["by_half"] = {
            h: _metrics(
                [i for i in items if i.get("half") == h],
                [r for i, r in zip(items, results, strict=True) if i.get("half") == h],
                policy,
            )
            for h in halves
        }
    errors = []
    for item, res in zip(items, results, strict=True):
        expect = item["expect"]
        if expect == "reject" and item.get("key") and policy_exclusion(policy, item["key"]) is None:
            expect = "accept"
        got_key = res.exclusion_key
        wrong = res.verdict != expect or (expect == "reject" and got_key != item.get("key"))
        wrong = wrong or (
            expect == "emergency" and res.emergency is not None and res.emergency.line != item.get("line")
        )
        if expect == "accept" and res.verdict == "accept":
            wrong = wrong or bool(item.get("urgent")) != bool(detect_urgent(item["text"]))
        if wrong:
            errors.append(
                {
                    "text": item["text"],
                    "half": item.get("half"),
                    "expect": [expect, item.get("line") or item.get("key") or item.get("urgent")],
                    "got": [
                        res.verdict,
                        (res.emergency.line if res.emergency else None)
                        or got_key
                        or detect_urgent(item["text"]),
                        res.emergency.matched if res.emergency else None,
                    ],
                }
            )
    report["errors"] = errors
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m triage.screening eval [POLICY_NAME_OR_PATH] [EVAL_PATH]`` prints the metrics as JSON;
    ``python -m triage.screening POLICY`` screens stdin line by line."""
    from models.policy import load_policy

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "eval":
        name = args[1] if len(args) > 1 else "all"
        policy = all_keys_policy(load_policy("quxian")) if name == "all" else load_policy(name)
        path = args[2] if len(args) > 2 else EVAL_PATH
        print(json.dumps(evaluate_screening(path, policy), ensure_ascii=False, indent=1))
        return 0
    policy = load_policy(args[0] if args else "quxian")
    for line in sys.stdin:
        if line.strip():
            res = screen(line, policy)
            print(
                json.dumps(
                    {
                        "verdict": res.verdict,
                        "redirect": res.emergency.line if res.emergency else None,
                        "matched": res.emergency.matched if res.emergency else None,
                        "reason": res.exclusion.reason if res.exclusion else None,
                        "key": res.exclusion_key,
                        "urgent": res.urgent_level,
                    },
                    ensure_ascii=False,
                )
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
