"""Unit routing: a supervised text model fused with similarity to each unit's duty text (职责).

The duty-text part covers every unit of the catalog, so a unit with no training examples can still be
ranked first when a message paraphrases its duties.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from models.catalog import read_catalog
from triage.tokenizer import tokenize


def duty_texts() -> tuple[list[str], list[str]]:
    units = [u for u in read_catalog() if u["code"] != "center"]
    return [u["code"] for u in units], [f"{u['name']}：{u.get('duties', '')}" for u in units]


def _embed(texts: list[str]) -> np.ndarray:
    from triage.embedding import get_encoder

    return get_encoder().encode(texts, prefix="query: ")


def build_duty_features(codes: list[str], duties: list[str]) -> dict[str, Any]:
    lex = TfidfVectorizer(analyzer=tokenize, sublinear_tf=True)
    lex_matrix = lex.fit_transform(duties)
    return {"duty_lex": lex, "duty_lex_matrix": lex_matrix, "duty_emb": _embed(duties)}


def duty_similarity(model: dict[str, Any], texts: list[str]) -> np.ndarray:
    """(n, units) similarity of each text to each unit's duty text: embedding cosine + word overlap."""
    q_lex = model["duty_lex"].transform(texts)
    lex = (q_lex @ model["duty_lex_matrix"].T).toarray()
    emb = _embed(texts) @ model["duty_emb"].T
    # centre the embedding cosine per query: e5 cosines sit in a narrow band around 0.8
    emb = (emb - emb.mean(axis=1, keepdims=True)) / (emb.std(axis=1, keepdims=True) + 1e-6)
    return model["w_duty_lex"] * lex + model["w_duty_emb"] * emb


def route_scores(model: dict[str, Any], texts: list[str]) -> np.ndarray:
    """Fused unit scores, columns in ``model['unit_codes']`` order, roughly in [0, 1]."""
    sup = model["unit_model"].predict_proba(texts)
    full = np.zeros((len(texts), len(model["unit_codes"])), dtype=float)
    index = {c: i for i, c in enumerate(model["unit_codes"])}
    for j, code in enumerate(model["unit_model"].classes_):
        full[:, index[code]] = sup[:, j]
    duty = duty_similarity(model, texts)
    duty = np.exp(duty - duty.max(axis=1, keepdims=True))
    duty /= duty.sum(axis=1, keepdims=True)
    return model["w_sup"] * full + (1 - model["w_sup"]) * duty
