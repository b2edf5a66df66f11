"""Policy presets: each jurisdiction's time limits and rules, one YAML file per source regulation.

Every number in a preset carries the document article it encodes (``cite``). The workflow and the
scheduler read rules only from here, never from ``if jurisdiction == ...`` branches.

Durations are strings: ``"2wd"`` working days, ``"12h"`` hours, ``"5d"`` calendar days, ``"30m"``
minutes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

PRESET_DIR = Path(__file__).parent / "presets"
REQUEST_TYPES = ("consultation", "help", "complaint", "report", "suggestion")
REJECT_REASONS = (
    "litigation",
    "out_of_jurisdiction",
    "discipline",
    "other_organs",
    "secrets_privacy",
    "no_content",
    "handled",
)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(wd|d|h|m)$")


@dataclass(frozen=True)
class Duration:
    """A policy time limit: an amount in working days, calendar days, hours or minutes."""

    amount: float
    unit: Literal["wd", "d", "h", "m"]

    @classmethod
    def parse(cls, text: str) -> Duration:
        m = _DURATION.match(str(text).strip())
        if not m:
            raise ValueError(f"bad duration {text!r}: use e.g. 2wd, 5d, 12h, 30m")
        return cls(float(m.group(1)), m.group(2))  # type: ignore[arg-type]

    def __str__(self) -> str:
        amount = int(self.amount) if self.amount == int(self.amount) else self.amount
        return f"{amount}{self.unit}"

    def zh(self) -> str:
        amount = int(self.amount) if self.amount == int(self.amount) else self.amount
        return f"{amount}" + {"wd": "个工作日", "d": "天", "h": "小时", "m": "分钟"}[self.unit]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(_Strict):
    """A single time limit and the article it comes from."""

    limit: str
    cite: str

    @field_validator("limit")
    @classmethod
    def _check(cls, v: str) -> str:
        Duration.parse(v)
        return v

    @property
    def duration(self) -> Duration:
        return Duration.parse(self.limit)


class UrgentLevel(_Strict):
    """An accelerated track: a first response within ``respond``, finished within ``finish``."""

    name_zh: str
    respond: str
    finish: str
    cite: str


class ReturnRule(_Strict):
    window: Rule
    # what happens to a return requested after the window: "refuse" (the unit must handle it) or
    # "overdue" (accepted for review but the ticket is counted as overdue, 渠县 第十一条（二）)
    late: Literal["refuse", "overdue"]
    max_count: int | None = None
    # a longer window when the unit must first check on site (大连 第十五条: 3 working days)
    window_site_check: Rule | None = None
    # a unit designated by the center's coordination may not return the ticket again
    # (平利 第九条, 渠县 第十条, 大连 第十五条)
    designated_final: bool = False
    cite: str


class ExtensionRule(_Strict):
    max_count: int
    max_each: str | None = None  # per extension; None = same as the original limit
    max_total: str | None = None  # across all extensions
    max_each_complex: str | None = None  # per extension for especially major/complex matters (渠县)
    same_as_limit: bool = False  # each extension may equal the type's limit (平利)
    request_before_expiry: str | None = None  # must be asked at least this long before the deadline
    not_for: list[str] = Field(default_factory=list)  # request types with no extension
    needs_leader_from: int | None = None  # the n-th extension needs a unit leader (大连)
    not_for_urgent: bool = False  # urgent tickets get no extension (平利 第十三条 "除突发类事项外")
    cite: str


class RedoRule(_Strict):
    max_count: int
    limit: str | None = None  # time allowed for the redo; None = the type's own limit
    second_unsatisfied: Literal["manual_revisit", "supervise", "rectify", "archive"]
    # an "unsatisfied" from the automated (SMS) survey is first confirmed by a person's revisit; only
    # an unsatisfied manual revisit sends the ticket back (宿迁 第十条（五）, 大连 第二十一条)
    manual_revisit_first: bool = False
    cite: str


class AppealRule(_Strict):
    allowed: bool
    window: str | None = None  # from the unsatisfied rating
    review: str | None = None  # the center's first review
    evidence: str | None = None  # unit's supplementary evidence
    cite: str


class SurveyRule(_Strict):
    window: str  # no answer within this → archived as "no rating"
    reminder_after: str
    cite: str


class RepeatRule(_Strict):
    after_close: str  # same issue again within this time after closure
    unresolved_after: str | None = None  # or still unresolved after this and raised again
    cite: str


class WarningRule(_Strict):
    yellow_fraction: float = 0.75  # yellow card when this share of the limit has passed
    yellow_before: str | None = "1wd"  # ... or this long before the deadline, whichever is first
    red_when_overdue: bool = True
    escalation: list[str] = Field(default_factory=list)  # nth overdue → action, in order
    cite: str


class Exclusion(_Strict):
    """A kind of request the hotline may not accept, with the wording the citizen is shown."""

    key: str  # fine-grained id, e.g. "arbitration", "military", "over_two_years"
    reason: str  # contract code, one of REJECT_REASONS
    wording: str  # what the citizen is told (Chinese)
    go_to: str  # where to go instead (Chinese)
    cite: str

    @field_validator("reason")
    @classmethod
    def _reason(cls, v: str) -> str:
        if v not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {v!r}")
        return v


class Policy(_Strict):
    name: str
    title: str  # the document's title
    document: str  # document number, e.g. 渠府办〔2023〕66号
    date: str | None = None
    jurisdiction: str
    clock_start: Literal["immediate", "next_day"]
    clock_start_cite: str
    dispatch: Rule  # center → unit
    sign: Rule
    returns: ReturnRule
    limits: dict[str, Rule]  # per request type
    # the unit must contact the citizen within this after signing, per request type (宿州 求助类)
    contact: dict[str, Rule] = Field(default_factory=dict)
    # a ticket the unit can answer without investigation must be answered within this (宿迁 4 小时)
    direct_answer: Rule | None = None
    # the center checks a submitted reply within this (大连 第二十一条)
    review: Rule | None = None
    urgent: dict[str, UrgentLevel]  # e.g. special, special_urgent
    extension: ExtensionRule
    redo: RedoRule
    appeal: AppealRule
    survey: SurveyRule
    repeat: RepeatRule
    warning: WarningRule
    real_name_required: list[str] = Field(default_factory=list)
    real_name_cite: str | None = None
    exclusions: list[Exclusion]
    notes: list[str] = Field(default_factory=list)  # what the document says that is not encoded, and why

    @field_validator("limits")
    @classmethod
    def _all_types(cls, v: dict[str, Rule]) -> dict[str, Rule]:
        missing = set(REQUEST_TYPES) - set(v)
        if missing:
            raise ValueError(f"limits missing for {sorted(missing)}")
        return v

    def limit_for(self, request_type: str) -> Duration:
        return self.limits[request_type].duration

    def exclusion(self, reason_or_key: str) -> Exclusion | None:
        for ex in self.exclusions:
            if ex.key == reason_or_key:
                return ex
        for ex in self.exclusions:
            if ex.reason == reason_or_key:
                return ex
        return None

    def summary(self) -> dict:
        """The machine-readable view printed by ``hotline policy show --json``."""
        data = self.model_dump()
        data["limits"] = {k: r.limit for k, r in self.limits.items()}
        data["limit_cites"] = {k: r.cite for k, r in self.limits.items()}
        data["sign"] = self.sign.limit
        data["return_window"] = self.returns.window.limit
        return data


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@lru_cache(maxsize=16)
def load_policy(name_or_path: str) -> Policy:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise KeyError(f"no policy preset {name_or_path!r}; available: {', '.join(preset_names())}")
    with path.open(encoding="utf-8") as fh:
        return Policy.model_validate(yaml.safe_load(fh))
