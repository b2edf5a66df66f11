"""Triage end to end: screening first, then the request type and the ranked units, as the DESIGN.md
contract says.

``Triager.load()`` reads the shipped artifacts (``triage/artifacts/triage.joblib``, built by
``hotline train``); ``triage(text)`` returns a ``TriageResult`` whose ``to_dict()`` is the contract JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from models.policy import Policy, load_policy
from models.settings import get_settings
from triage.screening import policy_urgent_level, screen

log = logging.getLogger(__name__)
ARTIFACTS = Path(__file__).parent / "artifacts"
MODEL_FILE = "triage.joblib"
KBLookup = Callable[[str], tuple[str, float] | None]


@dataclass
class TriageResult:
    verdict: str
    type: str | None = None
    confidence: float = 0.0
    urgent: bool = False
    urgent_level: str | None = None
    units: list[str] = field(default_factory=list)
    co_units: list[str] = field(default_factory=list)
    redirect: str | None = None
    label: str | None = None  # the emergency's kind, e.g. 火警
    reason: str | None = None
    key: str | None = None
    wording: str | None = None
    go_to: str | None = None
    basis: str | None = None
    kb: dict[str, Any] | None = None
    needs_review: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "verdict": self.verdict,
            "type": self.type,
            "confidence": round(float(self.confidence), 4),
            "urgent": self.urgent,
            "units": list(self.units),
        }
        if self.co_units:
            out["co_units"] = list(self.co_units)
        if self.verdict == "emergency":
            out["redirect"] = self.redirect
            out["label"] = self.label
        if self.verdict == "reject":
            out.update(reason=self.reason, key=self.key, wording=self.wording, go_to=self.go_to, basis=self.basis)
        if self.kb:
            out["kb"] = self.kb
        if self.urgent_level:
            out["urgent_level"] = self.urgent_level
        out["needs_review"] = self.needs_review
        return out


class Triager:
    def __init__(self, model: dict[str, Any], policy: Policy, kb_lookup: KBLookup | None = None) -> None:
        self.model = model
        self.policy = policy
        self.kb_lookup = kb_lookup
        self.types: list[str] = list(model["type_model"].classes_)
        self.min_top = model.get("min_top", 0.45)
        self.min_gap = model.get("min_gap", 0.12)

    @classmethod
    def load(
        cls, artifacts_dir: Path | None = None, policy: Policy | None = None, kb_lookup: KBLookup | None = None
    ) -> Triager:
        path = Path(artifacts_dir or ARTIFACTS) / MODEL_FILE
        model = joblib.load(path)
        return cls(model, policy or load_policy(get_settings().policy), kb_lookup)

    # ------------------------------------------------------------------ pieces

    def type_proba(self, texts: list[str]) -> np.ndarray:
        return self.model["type_model"].predict_proba(texts)

    def unit_scores(self, texts: list[str]) -> np.ndarray:
        from triage.routing import route_scores

        return route_scores(self.model, texts)

    # ------------------------------------------------------------------ the contract

    def triage(self, text: str) -> TriageResult:
        return self.triage_many([text])[0]

    def triage_many(self, texts: list[str]) -> list[TriageResult]:
        results: list[TriageResult | None] = [None] * len(texts)
        todo: list[int] = []
        for i, text in enumerate(texts):
            s = screen(text or "", self.policy)
            if s.verdict == "emergency" and s.emergency is not None:
                results[i] = TriageResult("emergency", type="help", confidence=1.0, urgent=True,
                                          redirect=s.emergency.line, label=s.emergency.label_zh)
            elif s.verdict == "reject" and s.exclusion is not None:
                ex = s.exclusion
                results[i] = TriageResult("reject", confidence=1.0, reason=ex.reason, key=ex.key,
                                          wording=ex.wording, go_to=ex.go_to, basis=ex.cite)
            else:
                level = policy_urgent_level(self.policy, s.urgent_level) if s.urgent_level else None
                results[i] = TriageResult("accept", urgent=bool(level), urgent_level=level)
                todo.append(i)
        if todo:
            batch = [texts[i][:512] for i in todo]
            proba = self.type_proba(batch)
            units = self.unit_scores(batch)
            codes = self.model["unit_codes"]
            for row, i in enumerate(todo):
                r = results[i]
                assert r is not None
                order = np.argsort(-proba[row])
                top, second = proba[row][order[0]], proba[row][order[1]]
                r.type = str(self.types[order[0]])
                r.confidence = float(top)
                r.needs_review = bool(top < self.min_top or top - second < self.min_gap)
                ranked = np.argsort(-units[row])
                r.units = [codes[j] for j in ranked[:5]]
                lead = float(units[row][ranked[0]])
                # co-handling units: only those whose score is close to the lead's (the request spans duties)
                ratio = self.model.get("co_ratio", 0.8)
                r.co_units = [codes[j] for j in ranked[1:3] if float(units[row][j]) >= lead * ratio]
                r.needs_review = bool(r.needs_review or lead < self.model.get("min_unit", 0.2))
                if self.kb_lookup is not None and r.type == "consultation":
                    hit = self.kb_lookup(texts[i])
                    if hit is not None:
                        r.kb = {"id": hit[0], "score": round(float(hit[1]), 4)}
        return [r for r in results if r is not None]
