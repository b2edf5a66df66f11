"""Embedding backstop for emergency screening: catches live emergencies the rules of ``triage.screening`` miss.

The rules are precise but brittle on wording they have never seen (1.0 recall on their own eval set, 0.61-0.80
on fresh batches). This module compares the message's e5 embedding — the one the pipeline already computes for
classification, so it costs a matrix product — with hand-written prototypes of each emergency line and with
hard negatives (``triage/data/emergency_prototypes.yaml``):

* line score = mean cosine similarity of the ``k`` nearest prototypes of that line;
* negative score = mean cosine similarity of the ``k`` nearest negatives;
* the best line — among lines the text can be about: 96333 needs a lift word, 122 a vehicle word — is returned
  when its score reaches ``min_similarity`` AND beats the negative score by ``min_margin``, unless one of the
  guards says the message is not about something happening now (:func:`guard`: past / resolved / habitual /
  hypothetical / future / education / administration / a question or complaint about a service / a long letter
  with no urgency word / a traffic accident without injury). The guards reuse the compiled phrase lists and time
  helpers of ``triage.screening`` (``load_rules``, ``_Context.is_past``, ``_habitual``); only the narrow
  "question or complaint" list is new.

Only call it for messages screening ACCEPTED (an emergency is already redirected; a rejected message is out of
scope). The pipeline plugs it in with one call::

    hit = backstop([text], emb[row:row + 1])[0]      # emb: the (n, 384) e5 matrix of _classify
    if hit is not None:  # same Emergency object as screening: hit.line, hit.label_zh, hit.matched
        ...redirect like a rule emergency...

Thresholds (``thresholds`` in the YAML) were fitted on ``triage/data/emergency_dev.jsonl`` with
``python -m triage.emergency_backstop fit`` (highest dev recall of rules + backstop such that the backstop adds at
most 0.5% false alarms on the dev negatives; ties to the largest margin), then frozen before the fresh test set
``triage/data/emergency_test.jsonl`` was written. Measured there (161 emergencies, 309 non-emergencies): recall
rules 0.646, backstop alone 0.826, both 0.932; false alarms rules 3.6%, both 6.1% (the backstop adds 2.6%).
``python -m triage.emergency_backstop eval [PATH]`` prints :func:`evaluate_emergencies`;
``python -m triage.emergency_backstop flags CSV...`` counts what the combined screen flags in the ``text`` column
of real (non-emergency) letters.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from triage.screening import (
    Emergency,
    _Context,
    _habitual,
    detect_emergency,
    load_rules,
    normalise,
    screen,
)

log = logging.getLogger(__name__)

DATA = Path(__file__).parent / "data"
PROTOTYPES_PATH = DATA / "emergency_prototypes.yaml"
DEV_PATH = DATA / "emergency_dev.jsonl"
TEST_PATH = DATA / "emergency_test.jsonl"
PREFIX = "query: "  # the pipeline's embedding prefix (triage.classifier.embed)
LINES = ("110", "119", "120", "122", "96333")


@dataclass(frozen=True)
class Thresholds:
    k: int = 3
    min_similarity: float = 0.88
    min_margin: float = 0.01


@dataclass
class PrototypeIndex:
    """Unit vectors of the prototypes of each line (stacked) and of the negatives."""

    texts: list[str]
    labels: np.ndarray  # (m,) line of each positive prototype
    positives: np.ndarray  # (m, dim)
    neg_texts: list[str]
    negatives: np.ndarray  # (q, dim)
    thresholds: Thresholds

    def scores(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, 5) k-NN similarity per line (order of ``LINES``), (n,) k-NN similarity to the negatives, and
        (n,) index of the nearest positive prototype."""
        e = np.asarray(embeddings, dtype=np.float32)
        if e.ndim == 1:
            e = e[None, :]
        k = self.thresholds.k
        sim = e @ self.positives.T
        per_line = np.stack([_topk_mean(sim[:, self.labels == line], k) for line in LINES], axis=1)
        neg = _topk_mean(e @ self.negatives.T, k)
        return per_line, neg, sim.argmax(axis=1)


def _topk_mean(sim: np.ndarray, k: int) -> np.ndarray:
    if sim.shape[1] == 0:
        return np.full(sim.shape[0], -1.0, dtype=np.float32)
    k = min(k, sim.shape[1])
    part = np.partition(sim, sim.shape[1] - k, axis=1)[:, -k:]
    return part.mean(axis=1)


def load_prototypes(path: str | Path = PROTOTYPES_PATH) -> dict[str, Any]:
    with Path(path).open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    data["lines"] = {str(k): [str(t) for t in v] for k, v in data["lines"].items()}
    unknown = set(data["lines"]) - set(LINES)
    if unknown:
        raise ValueError(f"unknown emergency lines in {path}: {sorted(unknown)}")
    return data


def _encode(encoder: Any, texts: list[str], path: Path) -> np.ndarray:
    """Embed the prototype texts, reusing a small on-disk cache under ``data_dir/cache`` when possible."""
    name = f"{getattr(encoder, 'name', type(encoder).__name__)}|{PREFIX}"
    digest = hashlib.sha1((name + "\n" + "\n".join(texts)).encode()).hexdigest()[:16]
    cache: Path | None = None
    try:
        from models.settings import get_settings

        cache = Path(get_settings().data_dir) / "cache" / f"emergency-prototypes-{digest}.npy"
        if cache.exists():
            vectors = np.load(cache, allow_pickle=False)
            if vectors.shape[0] == len(texts):
                return vectors.astype(np.float32)
    except (OSError, ValueError):
        cache = None
    vectors = np.asarray(encoder.encode(texts, prefix=PREFIX), dtype=np.float32)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, vectors)
            os.replace(tmp, cache)
        except OSError as exc:  # a read-only data dir only costs ~1 s per start
            log.info("emergency prototype cache not written (%s)", exc)
    return vectors


def build_index(
    encoder: Any = None, path: str | Path = PROTOTYPES_PATH, thresholds: Thresholds | None = None
) -> PrototypeIndex:
    """Embed the prototypes with ``encoder`` (default: ``triage.embedding.get_encoder()``)."""
    if encoder is None:
        from triage.embedding import get_encoder

        encoder = get_encoder()
    data = load_prototypes(path)
    texts = [t for line in LINES for t in data["lines"].get(line, [])]
    labels = np.array([line for line in LINES for _ in data["lines"].get(line, [])])
    neg_texts = [str(t) for t in data["negatives"]]
    vectors = _encode(encoder, texts + neg_texts, Path(path))
    if thresholds is None:
        thresholds = Thresholds(**(data.get("thresholds") or {}))
    return PrototypeIndex(
        texts=texts,
        labels=labels,
        positives=vectors[: len(texts)],
        neg_texts=neg_texts,
        negatives=vectors[len(texts) :],
        thresholds=thresholds,
    )


_index: PrototypeIndex | None = None
_index_lock = threading.Lock()


def get_index() -> PrototypeIndex:
    """The process-wide index, built on first use with the process-wide encoder."""
    global _index
    if _index is None:
        with _index_lock:
            if _index is None:
                _index = build_index()
    return _index


def reset_index() -> None:
    global _index
    with _index_lock:
        _index = None


# ------------------------------------------------------------------------------------- guards

# A question about a service or a complaint (no "now / come quickly" word): the citizen is asking, not calling
# for help. Deliberately narrow: "咋办", "怎么办", "是不是漏了" occur in real emergencies and are not listed.
# guard() also applies screening's ``consultation_frames`` (procedures, progress, police already involved, product
# complaints), both unless a ``help_words`` word ("快来", "还在", ...) shows.
_CONSULT = re.compile(
    r"(?:安全|合理|正常|合法|合规|管用|有用|能报销|能赔|有责任)吗|有没有责任|谁来(?:管|查|清|修|赔|负责)|找谁|谁负责|谁管|"
    r"怎么(?:算|赔|处理|办理|申请|报销|收费)|想问|想咨询|咨询一下|请问|建议|投诉|表扬|感谢|谢谢|多少钱|涨价|收费|"
    r"派人(?:检查|来查|检测|看看)|请.{0,4}(?:检查|检测)"
)
_RESCUED = re.compile(r"(?:救|放|拉|抬|弄|接|捞|抱)出来了")


def _resolved(rx, t: str) -> bool:
    """``rx`` (screening's resolved markers) matches somewhere not right after a negation ("叫不醒了" is not
    "醒了"); a bare "出来了" counts only after a rescue verb ("救出来了", not "骨头戳出来了" or "跑出来了")."""
    for m in rx.finditer(t):
        if m.start() and t[m.start() - 1] in "不没未":
            continue
        if m.group(0) == "出来了" and not _RESCUED.match(t, max(0, m.start() - 1)):
            continue
        if m.group(0) == "灭了" and "灯" in t[max(0, m.start() - 2) : m.start()]:
            continue  # "灯也灭了": the light went out, no fire was put out
        return True
    return False


def guard(text: str, line: str | None = None) -> str | None:
    """Why the message is NOT about an emergency happening now ("past", "resolved", ...), or None.

    Text-level versions of the checks ``triage.screening`` applies around a rule match, built from the same
    compiled phrase lists and time helpers.
    """
    r = load_rules()
    t = normalise(text)
    if not t:
        return "empty"
    n = len(t)
    ctx = _Context(t, r)
    urgent = r.urgency.search(t) is not None
    if r.education_context.search(t):
        return "education"
    if n >= r.narrative_min and not urgent:
        return "narrative"  # a long letter with no "now / come quickly" word
    if ctx.is_past(0, n):
        return "past"
    if _resolved(r.resolved, t):
        return "resolved"
    if _habitual(ctx, 0, n, n):
        return "habitual"
    if not urgent and (r.hypothetical.search(t) or r.hypothetical_after.search(t)):
        return "hypothetical"
    if r.future.search(t) and not r.present.search(t):
        return "future"
    if not urgent and r.admin_context.search(t):
        return "admin"
    if not r.help_words.search(t) and (_CONSULT.search(t) or r.consultation.search(t)):
        return "consult"
    if line == "122":
        for rule in r.emergency:
            if rule.line == "122" and rule.no_injury is not None and rule.no_injury.search(t):
                return "no_injury"
    return None


# ------------------------------------------------------------------------------------- backstop


def _plausible_line(text: str, line_scores: np.ndarray) -> int:
    """Index (into ``LINES``) of the best-scoring line whose subject the text names (the rule file's
    ``backstop_line_needs``: 96333 a lift and someone held in it, 122 a vehicle in a crash); otherwise the next
    best line."""
    t = normalise(text)
    needs = load_rules().backstop_needs
    for j in np.argsort(-line_scores):
        if all(p.search(t) for p in needs.get(LINES[int(j)], ())):
            return int(j)
    return int(line_scores.argmax())


def backstop(
    texts: Sequence[str], embeddings: np.ndarray, *, index: PrototypeIndex | None = None
) -> list[Emergency | None]:
    """For each message screening accepted, the emergency line its embedding points to, or None.

    ``embeddings``: (n, dim) L2-normalised e5 vectors of ``texts`` with the ``query: `` prefix (the matrix the
    pipeline computes for classification). Returns :class:`triage.screening.Emergency` objects (``line``,
    ``label_zh``; ``matched`` = "≈" + the nearest prototype) so a hit is handled like a rule emergency.
    """
    texts = list(texts)
    if not texts:
        return []
    emb = np.asarray(embeddings, dtype=np.float32).reshape(len(texts), -1)
    idx = index or get_index()
    th = idx.thresholds
    per_line, neg, nearest = idx.scores(emb)
    labels = load_rules().lines
    out: list[Emergency | None] = []
    for i, text in enumerate(texts):
        j = _plausible_line(text, per_line[i])
        best, line = float(per_line[i, j]), LINES[j]
        if best < th.min_similarity or best - float(neg[i]) < th.min_margin or guard(text, line):
            out.append(None)
            continue
        out.append(Emergency(line=line, label_zh=labels[line], matched="≈" + idx.texts[int(nearest[i])]))  # type: ignore[arg-type]
    return out


def backstop_text(text: str, *, index: PrototypeIndex | None = None) -> Emergency | None:
    """Convenience for tools and tests: embed ``text`` with the process-wide encoder, then :func:`backstop`."""
    from triage.embedding import get_encoder

    return backstop([text], get_encoder().encode([text], prefix=PREFIX), index=index)[0]


# ------------------------------------------------------------------------------------- evaluation


def load_items(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _embed(texts: list[str]) -> np.ndarray:
    from triage.embedding import get_encoder

    return get_encoder().encode(texts, prefix=PREFIX, batch_size=64)


def _combined(
    texts: list[str], emb: np.ndarray, policy, index: PrototypeIndex | None
) -> tuple[list[Emergency | None], list[Emergency | None], list[Emergency | None]]:
    """(rules alone, backstop alone, rules + backstop the way the pipeline runs them)."""
    rules = [detect_emergency(t) for t in texts]
    alone = backstop(texts, emb, index=index)
    accepted = [screen(t, policy).verdict == "accept" for t in texts]
    combined = [
        r if r is not None else (b if ok else None) for r, b, ok in zip(rules, alone, accepted, strict=True)
    ]
    return rules, alone, combined


def _summary(items: list[dict], preds: list[Emergency | None]) -> dict:
    em = [(it, p) for it, p in zip(items, preds, strict=True) if it["expect"] == "emergency"]
    neg = [(it, p) for it, p in zip(items, preds, strict=True) if it["expect"] != "emergency"]
    hit = [(it, p) for it, p in em if p is not None]
    per_line = {}
    for line in LINES:
        mine = [p for it, p in em if it.get("line") == line]
        per_line[line] = {"recall": _ratio(sum(p is not None for p in mine), len(mine)), "n": len(mine)}
    return {
        "emergency_recall": _ratio(len(hit), len(em)),
        "emergency_line_accuracy": _ratio(sum(p.line == it.get("line") for it, p in hit), len(hit)),
        "false_alarm_rate": _ratio(sum(p is not None for _, p in neg), len(neg)),
        "false_alarms": sum(p is not None for _, p in neg),
        "per_line_recall": per_line,
    }


def evaluate_emergencies(
    path: str | Path = TEST_PATH, *, policy=None, index: PrototypeIndex | None = None
) -> dict:
    """Measure the emergency screen on a JSON-lines set of {"text", "expect": "emergency"|"accept", "line"}.

    Reports rules alone (``triage.screening.detect_emergency``), the backstop alone (every message), and the
    combination the pipeline runs (rules, then the backstop on messages screening accepted under ``policy``;
    default: the configured preset), plus the combined screen's misses and false alarms.
    """
    if policy is None:
        from models.policy import load_policy
        from models.settings import get_settings

        policy = load_policy(get_settings().policy)
    items = load_items(path)
    texts = [it["text"] for it in items]
    rules, alone, combined = _combined(texts, _embed(texts), policy, index)
    report: dict[str, Any] = {
        "n": len(items),
        "emergencies": sum(it["expect"] == "emergency" for it in items),
        "non_emergencies": sum(it["expect"] != "emergency" for it in items),
        "rules": _summary(items, rules),
        "backstop": _summary(items, alone),
        "combined": _summary(items, combined),
    }
    errors = []
    for it, r, b, c in zip(items, rules, alone, combined, strict=True):
        want = it.get("line") if it["expect"] == "emergency" else None
        got = c.line if c is not None else None
        if got != want:
            errors.append(
                {
                    "text": it["text"],
                    "expect": want,
                    "got": got,
                    "by": "rules" if r is not None else ("backstop" if c is not None else None),
                    "matched": c.matched if c is not None else None,
                    "guard": guard(it["text"], b.line if b else None) if want and c is None else None,
                }
            )
    report["errors"] = errors
    return report


def fit_thresholds(path: str | Path = DEV_PATH, *, max_false_alarm: float = 0.005, policy=None) -> dict:
    """Grid-search (k, min_similarity, min_margin) on a dev set: the highest combined recall for which the backstop
    ADDS at most ``max_false_alarm`` false alarms (share of the dev negatives) to those of the rules; ties go to
    the fewest added false alarms, then the largest margin, then the highest similarity floor."""
    if policy is None:
        from models.policy import load_policy

        policy = load_policy("quxian")
    items = load_items(path)
    texts = [it["text"] for it in items]
    emb = _embed(texts)
    base = build_index()
    rules = [detect_emergency(t) for t in texts]
    accepted = [screen(t, policy).verdict == "accept" for t in texts]
    guards = {(i, line): guard(t, line) for i, t in enumerate(texts) for line in LINES}
    is_em = np.array([it["expect"] == "emergency" for it in items])
    want = [it.get("line") for it in items]
    rules_flags = np.array([r is not None for r in rules])
    results = []
    for k in (1, 3, 5):
        idx = PrototypeIndex(
            base.texts, base.labels, base.positives, base.neg_texts, base.negatives, Thresholds(k=k)
        )
        per_line, neg, _ = idx.scores(emb)
        pick = [_plausible_line(t, per_line[i]) for i, t in enumerate(texts)]
        best = per_line[np.arange(len(texts)), pick]
        line = [LINES[j] for j in pick]
        for sim in np.arange(0.84, 0.931, 0.005):
            for margin in np.arange(-0.02, 0.0601, 0.002):
                flag = [
                    rules[i] is not None
                    or (
                        accepted[i]
                        and best[i] >= sim
                        and best[i] - neg[i] >= margin
                        and not guards[(i, line[i])]
                    )
                    for i in range(len(texts))
                ]
                flag_a = np.array(flag)
                recall = flag_a[is_em].mean()
                fa = (flag_a & ~rules_flags)[~is_em].mean()
                line_ok = np.mean(
                    [
                        (rules[i].line if rules[i] is not None else line[i]) == want[i]
                        for i in range(len(texts))
                        if is_em[i] and flag[i]
                    ]
                )
                results.append(
                    (
                        float(recall),
                        float(fa),
                        float(line_ok),
                        k,
                        round(float(sim), 3),
                        round(float(margin), 3),
                    )
                )
    ok = [r for r in results if r[1] <= max_false_alarm]
    ok.sort(key=lambda r: (-r[0], r[1], -r[5], -r[4]))
    return {
        "dev": str(path),
        "rules_recall": round(float(rules_flags[is_em].mean()), 4),
        "rules_false_alarm": round(float(rules_flags[~is_em].mean()), 4),
        "best": [
            dict(
                zip(
                    ("recall", "added_false_alarm", "line_acc", "k", "min_similarity", "min_margin"),
                    r,
                    strict=True,
                )
            )
            for r in ok[:10]
        ],
    }


def flag_texts(texts: Sequence[str], *, policy=None, index: PrototypeIndex | None = None) -> dict:
    """What the combined screen flags among messages known to be non-emergencies (real letters)."""
    if policy is None:
        from models.policy import load_policy
        from models.settings import get_settings

        policy = load_policy(get_settings().policy)
    texts = [t for t in texts if t and t.strip()]
    rules, alone, combined = _combined(texts, _embed(texts), policy, index)
    flagged = [
        {
            "text": t[:160],
            "line": c.line,
            "by": "rules" if r is not None else "backstop",
            "matched": c.matched,
        }
        for t, r, c in zip(texts, rules, combined, strict=True)
        if c is not None
    ]
    return {
        "n": len(texts),
        "rules_flagged": sum(r is not None for r in rules),
        "backstop_alone_flagged": sum(b is not None for b in alone),
        "combined_flagged": len(flagged),
        "combined_rate": _ratio(len(flagged), len(texts)),
        "by": dict(Counter(f["by"] for f in flagged)),
        "flagged": flagged,
    }


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cmd = args[0] if args else "eval"
    if cmd == "fit":
        print(
            json.dumps(fit_thresholds(args[1] if len(args) > 1 else DEV_PATH), ensure_ascii=False, indent=1)
        )
    elif cmd == "eval":
        print(
            json.dumps(
                evaluate_emergencies(args[1] if len(args) > 1 else TEST_PATH), ensure_ascii=False, indent=1
            )
        )
    elif cmd == "flags":
        texts: list[str] = []
        csv.field_size_limit(10**7)
        for p in args[1:]:
            with open(p, encoding="utf-8", newline="") as fh:
                texts += [row.get("text") or "" for row in csv.DictReader(fh)]
        print(json.dumps(flag_texts(texts), ensure_ascii=False, indent=1))
    else:
        print(
            "usage: python -m triage.emergency_backstop [fit DEV | eval TEST | flags CSV...]", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
