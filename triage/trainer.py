"""`hotline train`: build the triage artifacts deterministically from the product's own corpus, plus the
labelled real messages in ``../shared/data`` when that folder is present (never needed at run time).

Type model: jieba word TF-IDF + character 1–3-gram TF-IDF → logistic regression (balanced classes);
its probabilities give the confidence and the ambiguity rule. Unit model: the same features → logistic
regression over lead units, fused with duty-text similarity (triage/routing.py).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline

from triage.pipeline import ARTIFACTS, MODEL_FILE
from triage.routing import build_duty_features, duty_texts
from triage.tokenizer import tokenize

log = logging.getLogger(__name__)
CORPUS_DIR = Path(__file__).parent / "data" / "corpus"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TYPE_ZH = {"咨询": "consultation", "投诉": "complaint", "举报": "report", "求助": "help", "建议": "suggestion"}


def features() -> FeatureUnion:
    return FeatureUnion([
        ("words", TfidfVectorizer(analyzer=tokenize, sublinear_tf=True, min_df=1, max_features=60000)),
        ("chars", TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2,
                                  max_features=120000)),
    ])


def type_pipeline() -> Pipeline:
    return Pipeline([("features", features()),
                     ("clf", LogisticRegression(C=8.0, class_weight="balanced", max_iter=2000))])


def unit_pipeline() -> Pipeline:
    return Pipeline([("features", features()),
                     ("clf", LogisticRegression(C=8.0, class_weight="balanced", max_iter=2000))])


def load_corpus(corpus_dir: Path = CORPUS_DIR) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(corpus_dir.glob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    return rows


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def load_real(data_dir: Path | None) -> dict[str, list[tuple[str, Any]]]:
    """Real messages: 大连 types, 大连+佳木斯 units (mapped by unit_map.csv), Teddy domains (sets of units)."""
    out: dict[str, list[tuple[str, Any]]] = {"types": [], "units": [], "domains": []}
    if not data_dir or not Path(data_dir).exists():
        return out
    data_dir = Path(data_dir)
    unit_map = {r["unit_raw"]: r["units"].split() for r in _csv(data_dir / "unit_map.csv")}
    domain_map = {r["domain"]: r["units"].split() for r in _csv(data_dir / "domain_map.csv")}
    for r in _csv(data_dir / "dalian_train.csv"):
        if r["type_zh"] in TYPE_ZH:
            out["types"].append((r["text"], TYPE_ZH[r["type_zh"]]))
        if r["unit_raw"] in unit_map:
            out["units"].append((r["text"], unit_map[r["unit_raw"]][0]))
    for r in _csv(data_dir / "jiamusi_train.csv"):
        if r["unit_raw"] in unit_map:
            out["units"].append((r["text"], unit_map[r["unit_raw"]][0]))
    for r in _csv(data_dir / "teddy2020_train.csv"):
        if r["domain"] in domain_map:
            out["domains"].append((r["text"], domain_map[r["domain"]]))
    return out


def train(out_dir: Path | None = None, data_dir: Path | None = DEFAULT_DATA, *, seed: int = 0) -> dict[str, Any]:
    """Fit both models and the fusion weights; save ``triage.joblib``; return a summary."""
    t0 = time.perf_counter()
    np.random.seed(seed)
    corpus = [r for r in load_corpus() if r.get("type") and r.get("units")]
    real = load_real(data_dir)
    type_x = [r["text"] for r in corpus] + [t for t, _ in real["types"]]
    type_y = [r["type"] for r in corpus] + [y for _, y in real["types"]]
    type_model = type_pipeline().fit(type_x, type_y)

    codes, duties = duty_texts()
    unit_x = [r["text"] for r in corpus] + [t for t, _ in real["units"]]
    unit_y = [r["units"][0] for r in corpus] + [u for _, u in real["units"]]
    # Teddy Cup domains name a SET of acceptable units. A set of one is a plain label; for larger sets the
    # row is labelled with the member a first model (trained without these rows) ranks highest — one
    # hard-EM step, so no unit is pretended beyond what the first model already believes.
    single = [(t, u[0]) for t, u in real["domains"] if len(u) == 1]
    multi = [(t, u) for t, u in real["domains"] if len(u) > 1]
    unit_x += [t for t, _ in single]
    unit_y += [u for _, u in single]
    if multi:
        first = unit_pipeline().fit(unit_x, unit_y)
        proba = first.predict_proba([t for t, _ in multi])
        col = {c: i for i, c in enumerate(first.classes_)}
        for (text, units), row in zip(multi, proba, strict=True):
            known = [u for u in units if u in col]
            if known:
                unit_x.append(text)
                unit_y.append(max(known, key=lambda u: row[col[u]]))
    unit_model = unit_pipeline().fit(unit_x, unit_y)
    model: dict[str, Any] = {
        "type_model": type_model,
        "unit_model": unit_model,
        "unit_codes": codes,
        "w_sup": 0.75,
        "w_duty_lex": 1.0,
        "w_duty_emb": 0.5,
        "min_top": 0.45,
        "min_gap": 0.10,
        "co_ratio": 0.8,
        "min_unit": 0.15,
        **build_duty_features(codes, duties),
        "trained": {"corpus": len(corpus), "real_types": len(real["types"]), "real_units": len(real["units"]),
                    "teddy": len(real["domains"]), "seed": seed},
    }
    out_dir = Path(out_dir or ARTIFACTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, out_dir / MODEL_FILE, compress=3)
    summary = {**model["trained"], "seconds": round(time.perf_counter() - t0, 1),
               "size_mb": round((out_dir / MODEL_FILE).stat().st_size / 1e6, 2)}
    log.info("triage model trained: %s", summary)
    return summary
