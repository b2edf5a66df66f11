"""Measuring the triage models.

``cross_validate(data_dir, folds=5, seed=0)`` — the issue's protocol on the labelled real data: each source is
split into ``folds`` stratified folds; for fold k the models are built by ``training.fit_models`` on the product
corpus plus every other fold (calibration, fusion weights and thresholds come from a dev share of *those* rows),
and scored on fold k only. Reported:

* ``teddy_domain_accuracy`` — the top unit is right when it belongs to the Teddy Cup domain's unit set;
* ``dalian_type_macro_f1`` — macro-F1 over the five types on 大连 letters (表扬 rows excluded);
* ``routing_top1`` / ``routing_top3`` — the mapped unit set of 大连 + 佳木斯 letters contains the top unit / one
  of the top three.

Each test row is scored with its source's adaptation block (the model learns every board's own conventions);
``source_blind`` repeats the scores with the product's default block, i.e. what the shipped model does for a
message of unknown origin.

Embeddings of the data rows are cached on disk under ``/tmp`` (``cache_dir``) so repeated runs do not re-encode
them; the product itself never reads that cache.

``evaluate_file(path, triager=None)`` — ``hotline eval FILE``: JSON lines with ``text`` and optional ``type``,
``units``, ``verdict``, ``redirect``; per-class precision/recall/F1 and confusion matrix, routing top-1/top-3,
emergency recall (and false alarms) when verdict labels are present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.model_selection import StratifiedKFold

from triage import classifier
from triage.training import TYPES, Example, fit_models, load_corpus, load_real

log = logging.getLogger(__name__)

TARGETS = {"teddy_domain_accuracy": 0.92, "dalian_type_macro_f1": 0.60, "routing_top1": 0.88, "routing_top3": 0.97}
DEFAULT_CACHE = Path("/tmp/hotline-triage-emb")


# ------------------------------------------------------------------------------------------ embedding cache
class DiskEmbeddingCache:
    """Embeddings of evaluation rows on disk, keyed by the encoder's identity and the text (development only)."""

    def __init__(self, cache_dir: Path | str = DEFAULT_CACHE):
        from triage.embedding import get_encoder

        self.encoder = get_encoder()
        ident = json.dumps({"name": self.encoder.name, **self.encoder.describe()}, sort_keys=True, default=str)
        self.path = Path(cache_dir) / f"emb-{hashlib.sha1(ident.encode()).hexdigest()[:12]}.npz"
        self.vectors: dict[str, np.ndarray] = {}
        if self.path.exists():
            z = np.load(self.path)
            self.vectors = dict(zip(z["keys"].tolist(), z["E"], strict=True))
        self.dirty = False

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def __call__(self, texts: list[str], max_chars=None) -> np.ndarray:
        keys = [self.key(t) for t in texts]
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True) if k not in self.vectors))
        if missing:
            for t, v in zip(missing, self.encoder.encode(missing, prefix="query: "), strict=True):
                self.vectors[self.key(t)] = np.asarray(v, dtype=np.float32)
            self.dirty = True
            if len(missing) > 50:
                self.save()
        return np.stack([self.vectors[k] for k in keys]) if keys else np.zeros((0, self.encoder.dim), np.float32)

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.stem + ".tmp.npz")
        np.savez(tmp, keys=np.array(list(self.vectors)), E=np.stack(list(self.vectors.values())))
        tmp.replace(self.path)
        self.dirty = False


# ------------------------------------------------------------------------------------------ cross-validation
def assign_folds(rows: list[Example], folds: int, seed: int) -> np.ndarray:
    """Stratified folds within each source (Teddy by domain, 大连 by type, 佳木斯 by unit)."""
    out = np.full(len(rows), -1)
    for source in sorted({r.source for r in rows}):
        idx = [i for i, r in enumerate(rows) if r.source == source]
        if source == "teddy":
            strata = [rows[i].domain or "" for i in idx]
        elif source == "dalian":
            strata = [rows[i].type or "-" for i in idx]
        else:
            strata = [" ".join(rows[i].units) or "-" for i in idx]
        counts: dict[str, int] = {}
        for s in strata:
            counts[s] = counts.get(s, 0) + 1
        strata = [s if counts[s] >= folds else "rare" for s in strata]
        skf = StratifiedKFold(folds, shuffle=True, random_state=seed)
        for k, (_, test) in enumerate(skf.split(np.zeros(len(idx)), strata)):
            out[np.asarray(idx)[test]] = k
    return out


def predict_rows(model, rows: list[Example], source_aware: bool = True) -> tuple[list[str], list[list[str]]]:
    """Type and unit ranking for evaluation rows (no screening: the labels are about accepted requests)."""
    texts = [r.text for r in rows]
    X, emb = model.features.transform_parts(texts)
    sources = [r.source if source_aware else None for r in rows]
    raw = model.type_clf.raw(X, sources=sources)
    proba = model.type_clf.proba_from_raw(raw, sources=sources)
    types = [str(model.type_clf.classes_[j]) for j in np.argmax(proba, 1)]
    uproba = model.router.predict_proba(texts, X, emb, sources)
    codes = model.router.codes
    ranks = [[codes[j] for j in np.argsort(-p, kind="stable")] for p in uproba]
    return types, ranks


def score_rows(rows: list[Example], types: list[str], ranks: list[list[str]]) -> dict:
    out: dict = {}
    teddy = [i for i, r in enumerate(rows) if r.source == "teddy" and r.units]
    if teddy:
        out["teddy_domain_accuracy"] = float(np.mean([ranks[i][0] in rows[i].units for i in teddy]))
    dalian = [i for i, r in enumerate(rows) if r.source == "dalian" and r.type]
    if dalian:
        y = [rows[i].type for i in dalian]
        p = [types[i] for i in dalian]
        out["dalian_type_macro_f1"] = float(f1_score(y, p, average="macro", labels=list(TYPES), zero_division=0))
        out["dalian_type_per_class_f1"] = dict(
            zip(TYPES, map(float, f1_score(y, p, average=None, labels=list(TYPES), zero_division=0)), strict=True)
        )
    routed = [i for i, r in enumerate(rows) if r.source in ("dalian", "jiamusi") and r.units]
    if routed:
        out["routing_top1"] = float(np.mean([ranks[i][0] in rows[i].units for i in routed]))
        out["routing_top3"] = float(np.mean([bool(set(ranks[i][:3]) & set(rows[i].units)) for i in routed]))
        for source in ("dalian", "jiamusi"):
            sub = [i for i in routed if rows[i].source == source]
            if sub:
                out[f"routing_top1_{source}"] = float(np.mean([ranks[i][0] in rows[i].units for i in sub]))
    return out


def cross_validate(
    data_dir: Path | str = Path("../shared/data"),
    folds: int = 5,
    seed: int = 0,
    cache_dir: Path | str | None = DEFAULT_CACHE,
    only_folds: list[int] | None = None,
    progress=None,
) -> dict:
    """The issue's k-fold protocol (module docstring). ``only_folds`` runs a subset (quick checks)."""
    say = progress or (lambda msg: log.info(msg))
    t0 = time.perf_counter()
    real = load_real(Path(data_dir))
    if not real:
        raise FileNotFoundError(f"no labelled data under {data_dir}")
    corpus = load_corpus()
    fold_of = assign_folds(real, folds, seed)
    cache = DiskEmbeddingCache(cache_dir) if cache_dir else None
    if cache is not None:
        classifier.set_encode_function(cache)
    types: list[str | None] = [None] * len(real)
    ranks_aware: list[list[str] | None] = [None] * len(real)
    ranks_blind: list[list[str] | None] = [None] * len(real)
    types_blind: list[str | None] = [None] * len(real)
    fold_info = []
    try:
        if cache is not None:
            cache([r.text for r in real + corpus])
            cache.save()
        for k in only_folds if only_folds is not None else range(folds):
            train_rows = corpus + [r for r, f in zip(real, fold_of, strict=True) if f != k]
            test_idx = [i for i, f in enumerate(fold_of) if f == k]
            model = fit_models(train_rows, seed=seed, progress=lambda m, k=k: say(f"fold {k}: {m}"))
            test_rows = [real[i] for i in test_idx]
            t_aware, r_aware = predict_rows(model, test_rows, source_aware=True)
            t_blind, r_blind = predict_rows(model, test_rows, source_aware=False)
            for j, i in enumerate(test_idx):
                types[i], ranks_aware[i] = t_aware[j], r_aware[j]
                types_blind[i], ranks_blind[i] = t_blind[j], r_blind[j]
            fold_scores = score_rows(test_rows, t_aware, r_aware)
            fold_info.append({"fold": k, **{m: round(v, 4) for m, v in fold_scores.items() if isinstance(v, float)}})
            say(f"fold {k}: {fold_info[-1]} ({time.perf_counter() - t0:.0f}s)")
    finally:
        if cache is not None:
            cache.save()
            classifier.set_encode_function(None)
    done = [i for i, t in enumerate(types) if t is not None]
    rows = [real[i] for i in done]
    aware = score_rows(rows, [types[i] for i in done], [ranks_aware[i] for i in done])
    blind = score_rows(rows, [types_blind[i] for i in done], [ranks_blind[i] for i in done])
    return {
        "folds": folds,
        "seed": seed,
        "rows": {s: sum(1 for r in rows if r.source == s) for s in ("teddy", "dalian", "jiamusi")},
        **{m: _round(v) for m, v in aware.items()},
        "source_blind": {m: _round(v) for m, v in blind.items()},
        "targets": TARGETS,
        "met": {m: bool(aware.get(m, 0.0) >= t) for m, t in TARGETS.items()},
        "per_fold": fold_info,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _round(v):
    if isinstance(v, dict):
        return {k: round(float(x), 4) for k, x in v.items()}
    return round(float(v), 4)


# ------------------------------------------------------------------------------------------ hotline eval FILE
def evaluate_file(path: Path | str, triager=None) -> dict:
    """Score the shipped triage on a JSON-lines file (``text`` + optional ``type``/``units``/``verdict``/
    ``redirect``)."""
    if triager is None:
        from triage.pipeline import Triager

        triager = Triager.load()
    rows = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                row = json.loads(line)
                if "expect" in row and "verdict" not in row:  # the emergency test sets' spelling
                    row["verdict"] = "emergency" if row["expect"] == "emergency" else "accept"
                    if row.get("line"):
                        row["redirect"] = row["line"]
                if str(row.get("text", "")).strip():
                    rows.append(row)
    results = triager.triage_many([str(r["text"]) for r in rows])
    report: dict = {"rows": len(rows)}
    typed = [(r["type"], res.type) for r, res in zip(rows, results, strict=True) if r.get("type") in TYPES]
    typed = [(y, p) for y, p in typed if p is not None]
    if typed:
        y, p = zip(*typed, strict=True)
        prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=list(TYPES), zero_division=0)
        report["types"] = {
            t: {"precision": round(float(a), 4), "recall": round(float(b), 4), "f1": round(float(c), 4), "n": int(n)}
            for t, a, b, c, n in zip(TYPES, prec, rec, f1, sup, strict=True)
        }
        report["type_accuracy"] = round(float(np.mean([a == b for a, b in typed])), 4)
        report["type_macro_f1"] = round(float(f1_score(y, p, labels=list(TYPES), average="macro", zero_division=0)), 4)
        report["confusion"] = {"labels": list(TYPES), "matrix": confusion_matrix(y, p, labels=list(TYPES)).tolist()}
    routed = [(r["units"], res.units) for r, res in zip(rows, results, strict=True) if r.get("units")]
    routed = [(gold, got) for gold, got in routed if got]
    if routed:
        report["routing_top1"] = round(float(np.mean([got[0] == gold[0] for gold, got in routed])), 4)
        report["routing_top3"] = round(float(np.mean([gold[0] in got[:3] for gold, got in routed])), 4)
        report["routing_n"] = len(routed)
    if any("verdict" in r for r in rows):
        labelled = [(r.get("verdict"), res) for r, res in zip(rows, results, strict=True) if r.get("verdict")]
        emerg = [res for v, res in labelled if v == "emergency"]
        other = [res for v, res in labelled if v != "emergency"]
        if emerg:
            report["emergency_recall"] = round(sum(res.verdict == "emergency" for res in emerg) / len(emerg), 4)
            with_line = [
                (r.get("redirect"), res.redirect)
                for r, res in zip(rows, results, strict=True)
                if r.get("verdict") == "emergency" and r.get("redirect")
            ]
            if with_line:
                report["emergency_line_accuracy"] = round(float(np.mean([a == b for a, b in with_line])), 4)
        if other:
            report["emergency_false_alarm"] = round(sum(res.verdict == "emergency" for res in other) / len(other), 4)
        report["verdict_accuracy"] = round(float(np.mean([res.verdict == v for v, res in labelled])), 4)
    return report
