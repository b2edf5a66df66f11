"""Evaluate knowledge-base retrieval on the labelled question set (kb/data/kb_eval.yaml).

Each item is ``{question, expect: entry id | null, split: dev | test}``; ``expect: null`` marks a question the
knowledge base cannot answer, where any answer is a false answer. The threshold is tuned on the dev split
only and the numbers that count are the test split's.

    .venv/bin/python -m kb.evaluation            # evaluate with the shipped weights
    .venv/bin/python -m kb.evaluation --fit      # refit weights and threshold on dev, print and evaluate them
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kb.io import SEED_PATH
from kb.retrieval import CANDIDATES, DEFAULT_SCORER, Encoder, KnowledgeIndex, Scorer, VectorCache

EVAL_PATH = Path(__file__).parent / "data" / "kb_eval.yaml"
MAX_FALSE_ANSWER_RATE = 0.05
WRONG_ANSWER_COST = 3.0  # a wrong answer is worse than no answer (the request becomes a ticket instead)


@dataclass
class Outcome:
    question: str
    expect: str | None
    split: str
    ranked: list[str]
    scores: list[float]

    @property
    def top_score(self) -> float:
        return self.scores[0] if self.scores else 0.0

    @property
    def top_id(self) -> str | None:
        return self.ranked[0] if self.ranked else None


def load_eval(path: Path | str = EVAL_PATH) -> list[dict[str, Any]]:
    items = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or []
    return [i for i in items if str(i.get("question") or "").strip()]


def load_entries(path: Path | str = SEED_PATH) -> list[dict[str, Any]]:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or []


def default_encoder() -> Encoder:
    from triage.embedding import get_encoder

    return get_encoder()


def run(index: KnowledgeIndex, items: list[dict[str, Any]], on: date | None = None) -> list[Outcome]:
    outcomes = []
    for item in items:
        hits = index.search(str(item["question"]), k=3, on=on)
        outcomes.append(
            Outcome(
                question=str(item["question"]),
                expect=item.get("expect") or None,
                split=str(item.get("split") or "test"),
                ranked=[h.entry_id for h in hits],
                scores=[h.score for h in hits],
            )
        )
    return outcomes


def metrics(outcomes: list[Outcome], threshold: float) -> dict[str, Any]:
    """Ranking and answering quality of one split at one threshold."""
    answerable = [o for o in outcomes if o.expect]
    unanswerable = [o for o in outcomes if not o.expect]
    answered = [o for o in outcomes if o.scores and o.top_score >= threshold]
    right = [o for o in answered if o.expect and o.top_id == o.expect]
    wrong_entry = [o for o in answered if o.expect and o.top_id != o.expect]
    false = [o for o in answered if not o.expect]

    def rate(part: list[Outcome], whole: list[Outcome]) -> float:
        return round(len(part) / len(whole), 4) if whole else 0.0

    return {
        "n": len(outcomes),
        "answerable": len(answerable),
        "unanswerable": len(unanswerable),
        "top1": rate([o for o in answerable if o.top_id == o.expect], answerable),
        "top3": rate([o for o in answerable if o.expect in o.ranked[:3]], answerable),
        "answered_correctly": rate(right, answerable),  # answerable, answered with the expected entry
        "wrong_entry_rate": rate(wrong_entry, answerable),  # answerable, answered with another entry
        "false_answer_rate": rate(false, unanswerable),  # unanswerable, answered anyway
        "no_answer_rate": rate([o for o in answerable if o not in answered], answerable),
    }


def tune_threshold(outcomes: list[Outcome], max_false_answer_rate: float = MAX_FALSE_ANSWER_RATE) -> float:
    """The threshold with the best utility (right answers minus ``WRONG_ANSWER_COST`` per wrong one) whose
    false-answer rate stays within the limit. Pass dev outcomes only."""
    scores = sorted({round(o.top_score, 6) for o in outcomes if o.scores})
    if not scores:
        return DEFAULT_SCORER.threshold
    candidates = [scores[0] - 1e-6] + [(a + b) / 2 for a, b in itertools.pairwise(scores)]
    candidates.append(scores[-1] + 1e-6)
    best, best_utility = candidates[-1], -np.inf
    for t in candidates:
        m = metrics(outcomes, t)
        if m["false_answer_rate"] > max_false_answer_rate:
            continue
        answered = [o for o in outcomes if o.scores and o.top_score >= t]
        right = sum(1 for o in answered if o.expect and o.top_id == o.expect)
        utility = right - WRONG_ANSWER_COST * (len(answered) - right)
        if utility > best_utility:
            best, best_utility = t, utility
    return float(best)


def build_index(
    encoder: Encoder | None = None, kb_path: Path | str = SEED_PATH, scorer: Scorer = DEFAULT_SCORER
) -> KnowledgeIndex:
    """An index of the knowledge-base file; embeddings are kept in the on-disk cache between runs."""
    encoder = encoder or default_encoder()
    return KnowledgeIndex.build(load_entries(kb_path), encoder, scorer, VectorCache.default(encoder))


def evaluate(
    path: Path | str = EVAL_PATH,
    *,
    kb_path: Path | str = SEED_PATH,
    encoder: Encoder | None = None,
    index: KnowledgeIndex | None = None,
    scorer: Scorer | None = None,
    on: date | None = None,
) -> dict[str, Any]:
    """Top-1 / top-3 accuracy on answerable questions and false-answer rate on unanswerable ones, per split.

    The threshold is tuned on the dev split only; both splits are reported at that threshold, and also at the
    threshold the product ships with (``Scorer.threshold``).
    """
    index = index or build_index(encoder, kb_path)
    if scorer is not None:
        index = index.with_scorer(scorer)
    outcomes = run(index, load_eval(path), on=on)
    dev = [o for o in outcomes if o.split == "dev"]
    test = [o for o in outcomes if o.split == "test"]
    tuned = tune_threshold(dev)
    shipped = index.scorer.threshold
    return {
        "entries": len(index),
        "tuned_threshold": round(tuned, 4),
        "shipped_threshold": shipped,
        "dev": metrics(dev, tuned),
        "test": metrics(test, tuned),
        "shipped": {"dev": metrics(dev, shipped), "test": metrics(test, shipped)},
        "errors": [
            {"question": o.question, "expect": o.expect, "got": o.top_id, "score": round(o.top_score, 3)}
            for o in test
            if (o.expect and o.top_id != o.expect) or (not o.expect and o.top_score >= tuned)
        ],
    }


def fit_scorer(
    path: Path | str = EVAL_PATH, *, kb_path: Path | str = SEED_PATH, encoder: Encoder | None = None
) -> Scorer:
    """Fit the re-ranking weights and the confidence calibration on the dev split, then tune the threshold
    on dev. Paste the result into ``kb.retrieval.Scorer``'s defaults.

    Re-rank: pairwise logistic regression (the expected entry against every other candidate of the same
    question). Confidence: logistic regression telling a right top hit from a wrong one, where every top
    hit of an unanswerable question is wrong.
    """
    from sklearn.linear_model import LogisticRegression

    index = build_index(encoder, kb_path)
    dev = [i for i in load_eval(path) if i.get("split") == "dev"]
    pairs, labels = [], []
    for item in dev:
        if not item.get("expect"):
            continue
        hits = index.search(str(item["question"]), k=2 * CANDIDATES)
        feats = {h.entry_id: [h.features["sem"], h.features["bm25_q"], h.features["bm25_full"]] for h in hits}
        if item["expect"] not in feats:
            continue
        pos = np.asarray(feats.pop(item["expect"]))
        for other in feats.values():
            pairs += [pos - other, np.asarray(other) - pos]
            labels += [1, 0]
    ranker = LogisticRegression(C=100.0, fit_intercept=False, max_iter=5000).fit(np.asarray(pairs), labels)
    w = ranker.coef_[0]
    scorer = replace(
        index.scorer,
        w_sem=round(float(w[0]), 2),
        w_bm25_q=round(float(w[1]), 2),
        w_bm25_full=round(float(w[2]), 2),
    )
    ranked = index.with_scorer(scorer)
    x, y = [], []
    for item in dev:
        hits = ranked.search(str(item["question"]), k=1)
        if hits:
            f = hits[0].features
            x.append([f["sem"], f["sem_lead"], f["rank_lead"]])
            y.append(int(hits[0].entry_id == item.get("expect")))
    calib = LogisticRegression(C=100.0, max_iter=5000).fit(np.asarray(x), y)
    c = calib.coef_[0]
    scorer = replace(
        scorer,
        c_sem=round(float(c[0]), 2),
        c_sem_lead=round(float(c[1]), 2),
        c_rank_lead=round(float(c[2]), 2),
        c_bias=round(float(calib.intercept_[0]), 2),
    )
    outcomes = [o for o in run(index.with_scorer(scorer), load_eval(path)) if o.split == "dev"]
    return replace(scorer, threshold=round(tune_threshold(outcomes), 4))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate knowledge-base retrieval")
    parser.add_argument("path", nargs="?", default=str(EVAL_PATH))
    parser.add_argument("--kb", default=str(SEED_PATH))
    parser.add_argument("--fit", action="store_true", help="refit the re-ranking weights on dev")
    args = parser.parse_args(argv)
    scorer = None
    if args.fit:
        scorer = fit_scorer(args.path, kb_path=args.kb)
        print("fitted on dev:", json.dumps(asdict(scorer), ensure_ascii=False))
    print(json.dumps(evaluate(args.path, kb_path=args.kb, scorer=scorer), ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
