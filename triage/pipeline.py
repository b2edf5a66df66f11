"""Triage end to end: screening first, then the request type and the ranked units (DESIGN.md "Triage contract").

``Triager.load()`` reads the shipped artifact (``triage/artifacts/triage_model.joblib``, built by
``triage.training.train``) and binds the unit catalog; ``triage(text)`` returns a ``TriageResult`` whose
``to_dict()`` is the contract JSON plus ``needs_review``, ``co_units`` and, for rejects, ``key``/``wording``/
``go_to``/``basis``.

Order: ``triage.screening.screen`` decides emergency / reject / accept (+ urgent level) first; an emergency is
redirected without classification. Accepted messages are featurised ONCE (jieba words, character n-grams and one
e5 embedding) and that matrix feeds both the type head and the router; the same embedding goes through
``triage.emergency_backstop`` first, which turns an accepted message into an emergency when it sits among the
hand-written emergency prototypes (wording the rules do not know).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.policy import Policy, load_policy
from triage.emergency_backstop import backstop
from triage.screening import policy_urgent_level, screen
from triage.training import ARTIFACTS_DIR, MODEL_FILE, TriageModel, load_model

log = logging.getLogger(__name__)
ARTIFACTS = ARTIFACTS_DIR
KBLookup = Callable[[str], "tuple[str, float] | None"]
MAX_CHARS = 1000  # longer messages are cut before featurising (the embedding itself reads ~180 characters)
RANKED_UNITS = 5


@dataclass
class TriageResult:
    verdict: str  # accept | emergency | reject
    type: str | None = None
    confidence: float = 0.0
    urgent: bool = False
    urgent_level: str | None = None
    units: list[str] = field(default_factory=list)  # ranked, best first (lead = units[0])
    co_units: list[str] = field(default_factory=list)  # co-handling units: close to the lead's score
    redirect: str | None = None  # emergency only
    label: str | None = None  # the emergency's kind, e.g. 火警
    reason: str | None = None  # reject only
    key: str | None = None
    wording: str | None = None
    go_to: str | None = None
    basis: str | None = None
    kb: dict[str, Any] | None = None
    needs_review: bool = False
    unit_scores: list[float] = field(default_factory=list)  # probabilities of ``units`` (not in the JSON)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "verdict": self.verdict,
            "type": self.type,
            "confidence": round(float(self.confidence), 4),
            "urgent": bool(self.urgent),
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
        out["needs_review"] = bool(self.needs_review)
        return out


class Triager:
    """Screening + type head + unit router over one shared featurisation (see the module docstring)."""

    def __init__(
        self,
        model: TriageModel,
        policy: Policy | None = None,
        kb_lookup: KBLookup | None = None,
        catalog: Sequence[dict] | None = None,
        emergency_backstop: bool = True,
    ) -> None:
        if policy is None:
            from models.settings import get_settings

            policy = load_policy(get_settings().policy)
        if catalog is None:
            from models.catalog import read_catalog

            catalog = read_catalog()
        self.model = model
        self.policy = policy
        self.kb_lookup = kb_lookup
        self.emergency_backstop = emergency_backstop
        model.router.set_catalog(list(catalog))  # re-encodes only duty clauses the artifact has not seen

    @classmethod
    def load(
        cls,
        artifacts_dir: Path | str | None = None,
        policy: Policy | None = None,
        kb_lookup: KBLookup | None = None,
        catalog: Sequence[dict] | None = None,
    ) -> Triager:
        return cls(load_model(artifacts_dir), policy=policy, kb_lookup=kb_lookup, catalog=catalog)

    @property
    def types(self) -> list[str]:
        return [str(t) for t in self.model.type_clf.classes_]

    @property
    def unit_codes(self) -> list[str]:
        return self.model.router.codes

    # ------------------------------------------------------------------ pieces (plain arrays, for tools)
    def features(self, texts: Sequence[str]):
        return self.model.features.transform_parts([t[:MAX_CHARS] for t in texts])

    def type_proba(self, texts: Sequence[str], X=None) -> np.ndarray:
        if X is None:
            X, _ = self.features(texts)
        return self.model.type_clf.proba_from_raw(self.model.type_clf.raw(X))

    def unit_proba(self, texts: Sequence[str], X=None, emb=None) -> np.ndarray:
        if X is None or emb is None:
            X, emb = self.features(texts)
        return self.model.router.predict_proba([t[:MAX_CHARS] for t in texts], X, emb)

    # ------------------------------------------------------------------ the contract
    def triage(self, text: str) -> TriageResult:
        return self.triage_many([text])[0]

    def triage_many(self, texts: Sequence[str]) -> list[TriageResult]:
        results: list[TriageResult] = []
        todo: list[int] = []
        for i, text in enumerate(texts):
            s = screen(text or "", self.policy)
            if s.verdict == "emergency" and s.emergency is not None:
                results.append(
                    TriageResult(
                        "emergency",
                        type="help",
                        confidence=1.0,
                        urgent=True,
                        redirect=s.emergency.line,
                        label=s.emergency.label_zh,
                    )
                )
            elif s.verdict == "reject" and s.exclusion is not None:
                ex = s.exclusion
                results.append(
                    TriageResult(
                        "reject",
                        confidence=1.0,
                        reason=ex.reason,
                        key=ex.key,
                        wording=ex.wording,
                        go_to=ex.go_to,
                        basis=ex.cite,
                    )
                )
            else:
                level = policy_urgent_level(self.policy, s.urgent_level) if s.urgent_level else None
                results.append(TriageResult("accept", urgent=bool(level), urgent_level=level))
                todo.append(i)
        if todo:
            self._classify([texts[i] or "" for i in todo], [results[i] for i in todo])
        return results

    def _classify(self, texts: list[str], results: list[TriageResult]) -> None:
        cut = [t[:MAX_CHARS] for t in texts]
        X, emb = self.model.features.transform_parts(cut)  # one embedding per message, shared below
        # the embedding backstop catches emergencies worded in ways the rules do not know (recall first)
        hits = backstop(cut, emb) if self.emergency_backstop else [None] * len(cut)
        for r, hit in zip(results, hits, strict=True):
            if hit is not None:
                r.verdict, r.type, r.confidence, r.urgent = "emergency", "help", 1.0, True
                r.redirect, r.label, r.urgent_level = hit.line, hit.label_zh, None
        type_clf, router = self.model.type_clf, self.model.router
        proba = type_clf.proba_from_raw(type_clf.raw(X))
        type_review = type_clf.needs_review(proba)
        uproba = router.predict_proba(cut, X, emb)
        unit_review = uproba.max(axis=1) < getattr(router, "review_min_", 0.0)
        for row, r in enumerate(results):
            if r.verdict == "emergency":
                continue
            best = int(np.argmax(proba[row]))
            r.type = str(type_clf.classes_[best])
            r.confidence = float(proba[row][best])
            route = router.result_from_proba(uproba[row])
            r.units = [c for c, _ in route.ranking[:RANKED_UNITS]]
            r.unit_scores = [round(p, 4) for _, p in route.ranking[:RANKED_UNITS]]
            r.co_units = route.units[1:]
            r.needs_review = bool(type_review[row] or unit_review[row])
            if self.kb_lookup is not None and r.type in ("consultation", "help"):
                hit = self.kb_lookup(texts[row])
                if hit is not None:
                    r.kb = {"id": str(hit[0]), "score": round(float(hit[1]), 4)}


def load_triager(policy_name: str | None = None, kb_lookup: KBLookup | None = None) -> Triager:
    """Convenience for the CLI: the shipped model with the named (or configured) policy preset."""
    policy = load_policy(policy_name) if policy_name else None
    return Triager.load(policy=policy, kb_lookup=kb_lookup)


__all__ = ["ARTIFACTS", "MODEL_FILE", "TriageResult", "Triager", "load_triager"]
