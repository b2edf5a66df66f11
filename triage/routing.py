"""The unit router: a ranked list over every unit of the catalog, lead first, co-units when close.

Score of unit ``u`` for a message (a conditional logit over the catalog's units)::

    known u:    a * log p_sup(u) + b1 * cos_max(u) + b2 * cos_top(u) + c * bm25(u)
    unknown u:  d1 * cos_max(u) + d2 * cos_top(u) + e * bm25(u) + g

* ``p_sup`` — a supervised linear model (``SourceAdapted(LinearSVC)`` over the shared text features) trained on
  the product corpus and any real tickets, with a temperature fitted on held-out rows. Set-valued labels (a
  Teddy Cup domain, a department that maps to two codes) are disambiguated the identification way: a first
  model trained on the single-unit rows picks, for each set row, the most plausible unit *inside its set*,
  and the final model trains on that.
* ``cos_max`` / ``cos_top`` — cosine between the message's e5 embedding and the embeddings of the unit's duty
  clauses (``duties`` in models/catalog/units.yaml): the best clause, and the mean of the best three.
* ``bm25`` — BM25 of the message's words and character bigrams against each unit's duty text (units are the
  documents, so a term named by one unit only weighs most).
* "unknown" units are catalog units the supervised model never saw (a unit added after training, or with no
  training rows): they compete on duty similarity alone, with their own weights and offset.

The weights are learned on a held-out split of the training data (never on evaluation folds) by maximising the
set-valued likelihood, with *unit dropout*: each held-out message is replayed with random units hidden from the
supervised model, which teaches the unknown branch how much duty similarity alone is worth. ``co_ratio``
(include a co-unit when p(co) >= co_ratio * p(lead)) is chosen on held-out corpus rows that name co-units.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.sparse as sp
from sklearn.svm import LinearSVC

from triage.classifier import SourceAdapted, embed, fit_temperature, log_softmax, softmax
from triage.tokenizer import tokenize

log = logging.getLogger(__name__)

_CLAUSE_SPLIT = re.compile(r"[；;。\n]+")
_HAN = re.compile(r"[\u4e00-\u9fff]")


def duty_clauses(name: str, duties: str) -> list[str]:
    """The unit's name plus each clause of its duty text (split at ；/。)."""
    out = [name] if name else []
    for clause in _CLAUSE_SPLIT.split(duties or ""):
        clause = clause.strip(" ，,、")
        if len(clause) >= 4:
            out.append(clause)
    return out


def bm25_terms(text: str) -> set[str]:
    """jieba words (two characters or more) and Chinese character bigrams."""
    terms = {w for w in tokenize(text) if len(w) >= 2}
    han = "".join(ch if _HAN.match(ch) else " " for ch in text)
    for chunk in han.split():
        terms.update(chunk[i : i + 2] for i in range(len(chunk) - 1))
    return terms


@dataclass(frozen=True)
class CatalogUnit:
    code: str
    name: str
    duties: str


def routable_units(catalog: Sequence[dict]) -> list[CatalogUnit]:
    """Units a ticket can be dispatched to: every catalog entry below the hotline platform itself (level >= 2)."""
    return [
        CatalogUnit(str(u["code"]), str(u.get("name", "")), str(u.get("duties", "") or ""))
        for u in catalog
        if int(u.get("level", 2)) >= 2
    ]


class DutyIndex:
    """Embeddings of the duty clauses and a BM25 index of the duty texts of a catalog.

    Clause embeddings are stored (float16) keyed by the clause text, so loading a model for an edited catalog
    only encodes the clauses that changed."""

    def __init__(self, units: Sequence[CatalogUnit], clause_cache: dict[str, np.ndarray] | None = None):
        self.codes = [u.code for u in units]
        self.fingerprint = catalog_fingerprint(units)
        clauses, owner = [], []
        for j, u in enumerate(units):
            for c in duty_clauses(u.name, u.duties):
                clauses.append(c)
                owner.append(j)
        self.clause_owner = np.asarray(owner, dtype=np.int32)
        self.owner_cols = [np.flatnonzero(self.clause_owner == j) for j in range(len(units))]
        cache = dict(clause_cache or {})
        missing = [c for c in dict.fromkeys(clauses) if c not in cache]
        if missing:
            for c, v in zip(missing, embed(missing), strict=True):
                cache[c] = np.asarray(v, dtype=np.float16)
        self.clause_cache = {c: cache[c] for c in clauses}
        self.clause_emb = np.stack([cache[c] for c in clauses]).astype(np.float32) if clauses else np.zeros((0, 384))
        # BM25 over units as documents
        docs = [bm25_terms(u.name + "；" + u.duties) for u in units]
        vocab = sorted(set().union(*docs)) if docs else []
        self.term_index = {t: i for i, t in enumerate(vocab)}
        n_docs = max(len(docs), 1)
        df = np.zeros(len(vocab))
        rows, cols = [], []
        for j, d in enumerate(docs):
            for t in d:
                rows.append(j)
                cols.append(self.term_index[t])
                df[self.term_index[t]] += 1
        lengths = np.array([len(d) for d in docs], dtype=float) if docs else np.zeros(0)
        avg = lengths.mean() if len(lengths) else 1.0
        k1, b = 1.2, 0.75
        idf = np.log(1 + (n_docs - df + 0.5) / (df + 0.5))
        # binary term frequency in the duty text: weight = idf * (k1 + 1) / (1 + k1 * (1 - b + b * len/avg))
        norm = (k1 + 1) / (1 + k1 * (1 - b + b * lengths / avg)) if len(lengths) else lengths
        data = [idf[c] * norm[r] for r, c in zip(rows, cols, strict=True)]
        self.term_unit = sp.csr_matrix((data, (cols, rows)), shape=(len(vocab), len(docs)), dtype=np.float32)

    def similarity(self, texts: Sequence[str], emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cos_max, cos_top3, log1p bm25), each (n, units)."""
        n, u = len(texts), len(self.codes)
        cos = np.asarray(emb, dtype=np.float32) @ self.clause_emb.T  # (n, clauses)
        cos_max = np.full((n, u), -1.0)
        cos_top = np.full((n, u), -1.0)
        for j in range(u):
            cols = self.owner_cols[j]
            if len(cols) == 0:
                continue
            block = np.sort(cos[:, cols], axis=1)
            cos_max[:, j] = block[:, -1]
            cos_top[:, j] = block[:, -3:].mean(axis=1)
        q_rows, q_cols = [], []
        for i, text in enumerate(texts):
            for t in bm25_terms(text):
                k = self.term_index.get(t)
                if k is not None:
                    q_rows.append(i)
                    q_cols.append(k)
        q = sp.csr_matrix(
            (np.ones(len(q_rows), dtype=np.float32), (q_rows, q_cols)), shape=(n, len(self.term_index))
        )
        bm = np.log1p(np.asarray((q @ self.term_unit).todense(), dtype=np.float64))
        return cos_max, cos_top, bm


def catalog_fingerprint(units: Sequence[CatalogUnit]) -> str:
    h = hashlib.sha1()
    for u in units:
        h.update(f"{u.code}\x1f{u.name}\x1f{u.duties}\x1e".encode())
    return h.hexdigest()[:16]


N_FUSION = 8  # a, b1, b2, c | d1, d2, e, g


def fused_scores(theta: np.ndarray, sup: np.ndarray, known: np.ndarray, cos_max, cos_top, bm) -> np.ndarray:
    a, b1, b2, c, d1, d2, e, g = theta
    sup0 = np.where(known, sup, 0.0)
    k = a * sup0 + b1 * cos_max + b2 * cos_top + c * bm
    u = d1 * cos_max + d2 * cos_top + e * bm + g
    return np.where(known, k, u)


def _known_logp(decision: np.ndarray, known: np.ndarray, temperature: float) -> np.ndarray:
    """log softmax of the supervised scores over the units that are known (others -> 0, masked)."""
    z = np.where(known, decision / temperature, -np.inf)
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
    return np.where(known, z - lse, 0.0)


class UnitRouter:
    """Supervised unit model + duty-text similarity, fused; see the module docstring.

    ``fit`` trains the supervised part; ``fit_fusion`` learns the fusion on held-out rows; ``set_catalog`` binds
    the catalog whose units are ranked (a changed catalog only re-encodes the changed duty clauses).
    """

    def __init__(
        self,
        C: float = 0.5,
        sources: Sequence[str] = (),
        default_source: str | None = "corpus",
        dropout: float = 0.15,
        seed: int = 0,
    ):
        self.C = C
        self.sources = tuple(sources)
        self.default_source = default_source
        self.dropout = dropout
        self.seed = seed
        self.theta_ = np.array([1.0, 0.0, 0.0, 0.0, 10.0, 0.0, 1.0, -5.0])
        self.temperature_ = 1.0
        self.co_ratio_ = 0.5
        self.review_min_ = 0.0
        self.duty_index_: DutyIndex | None = None

    # ----------------------------------------------------------------------------------- supervised part
    def fit(self, X, label_sets: Sequence[tuple], sources: Sequence[str | None]) -> UnitRouter:
        label_sets = [tuple(s) for s in label_sets]
        sources = list(sources)
        single = [i for i, s in enumerate(label_sets) if len(s) == 1]
        multi = [i for i, s in enumerate(label_sets) if len(s) > 1]
        labels = {i: label_sets[i][0] for i in single}
        if multi:
            first = self._svm().fit(X[single], [labels[i] for i in single], sources=[sources[i] for i in single])
            classes = list(first.classes_)
            dec = first.decision_function_by_source(X[multi], [sources[i] for i in multi])
            for row, i in zip(dec, multi, strict=True):
                inside = [classes.index(u) for u in label_sets[i] if u in classes]
                labels[i] = classes[max(inside, key=lambda j: row[j])] if inside else label_sets[i][0]
        idx = sorted(labels)
        self.model_ = self._svm().fit(X[idx], [labels[i] for i in idx], sources=[sources[i] for i in idx])
        self.classes_ = [str(c) for c in self.model_.classes_]
        return self

    def _svm(self) -> SourceAdapted:
        return SourceAdapted(
            LinearSVC(C=self.C, random_state=self.seed), sources=self.sources, default_source=self.default_source
        )

    # ----------------------------------------------------------------------------------- catalog
    def set_catalog(self, catalog: Sequence[dict]) -> UnitRouter:
        units = routable_units(catalog)
        old = self.duty_index_.clause_cache if self.duty_index_ is not None else None
        if self.duty_index_ is None or self.duty_index_.fingerprint != catalog_fingerprint(units):
            self.duty_index_ = DutyIndex(units, clause_cache=old)
        return self

    @property
    def codes(self) -> list[str]:
        return list(self.duty_index_.codes) if self.duty_index_ is not None else []

    def _supervised(self, X, sources: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """Decision values mapped onto the catalog's units (n, U) and the known-unit mask (U,)."""
        codes = self.codes
        dec = self.model_.decision_function_by_source(X, list(sources))
        col = {c: j for j, c in enumerate(self.classes_)}
        out = np.zeros((X.shape[0], len(codes)))
        known = np.zeros(len(codes), dtype=bool)
        for j, c in enumerate(codes):
            if c in col:
                out[:, j] = dec[:, col[c]]
                known[j] = True
        return out, known

    def components(self, texts, X, emb, sources) -> dict:
        decision, known = self._supervised(X, sources)
        cos_max, cos_top, bm = self.duty_index_.similarity(texts, emb)
        return {"decision": decision, "known": known, "cos_max": cos_max, "cos_top": cos_top, "bm": bm}

    def scores_from_components(self, comp: dict, known: np.ndarray | None = None) -> np.ndarray:
        known = comp["known"] if known is None else known
        known2 = np.broadcast_to(known, comp["decision"].shape)
        sup = _known_logp(comp["decision"], known2, self.temperature_)
        return fused_scores(self.theta_, sup, known2, comp["cos_max"], comp["cos_top"], comp["bm"])

    # ----------------------------------------------------------------------------------- fusion
    def fit_fusion(self, comp: dict, label_sets: Sequence[tuple], co_units: Sequence[tuple] | None = None):
        """Learn temperature, fusion weights (with unit dropout) and co_ratio on held-out components."""
        codes = self.codes
        member = np.zeros(comp["decision"].shape, dtype=bool)
        pos = {c: j for j, c in enumerate(codes)}
        for i, s in enumerate(label_sets):
            for u in s:
                if u in pos:
                    member[i, pos[u]] = True
        ok = member.any(1)
        known = comp["known"]
        self.temperature_ = fit_temperature(
            comp["decision"][ok][:, known], [tuple(u for u in s if u in pos) for s, o in zip(label_sets, ok, strict=True) if o],
            [c for c, k in zip(codes, known, strict=True) if k],
        )
        rng = np.random.default_rng(self.seed)
        parts = {k: comp[k][ok] for k in ("decision", "cos_max", "cos_top", "bm")}
        mem = member[ok]
        n, u = mem.shape
        reps = [np.broadcast_to(known, (n, u)).copy()]
        for _ in range(3):
            mask = reps[0] & (rng.random((n, u)) >= self.dropout)
            empty = ~mask.any(1)
            mask[empty] = reps[0][empty]
            reps.append(mask)
        K = np.concatenate(reps)
        D = {k: np.concatenate([v] * len(reps)) for k, v in parts.items()}
        M = np.concatenate([mem] * len(reps))
        sup = _known_logp(D["decision"], K, self.temperature_)

        def nll(theta):
            z = fused_scores(theta, sup, K, D["cos_max"], D["cos_top"], D["bm"])
            lp = log_softmax(z)
            inset = np.log(np.maximum((np.exp(lp) * M).sum(1), 1e-300))
            return -float(inset.mean()) + 1e-4 * float((theta[:-1] ** 2).sum())

        res = scipy.optimize.minimize(nll, self.theta_.copy(), method="L-BFGS-B")
        self.theta_ = res.x
        self.fusion_stats_ = {"nll": float(res.fun), "n": int(n)}
        self.review_min_, self.review_stats_ = self._choose_review_min(comp, member, ok)
        if co_units is not None:
            self.co_ratio_ = self._choose_co_ratio(comp, co_units, label_sets)
        return self

    def _choose_review_min(self, comp, member, ok, max_flagged: float = 0.1) -> tuple[float, dict]:
        """Lowest lead probability that still goes straight to dispatch: flag at most ``max_flagged`` of the
        held-out messages, those whose lead probability is lowest (they go to the center to confirm)."""
        proba = softmax(self.scores_from_components(comp))[ok]
        lead = proba.max(1)
        right = member[ok][np.arange(len(lead)), proba.argmax(1)]
        threshold = float(np.quantile(lead, max_flagged)) if len(lead) else 0.0
        keep = lead >= threshold
        stats = {
            "top1_all": float(right.mean()) if len(right) else 0.0,
            "top1_unflagged": float(right[keep].mean()) if keep.any() else 0.0,
            "flagged": float(1 - keep.mean()) if len(keep) else 0.0,
        }
        return threshold, stats

    def _choose_co_ratio(self, comp, co_units, label_sets) -> float:
        rows = [i for i, c in enumerate(co_units) if c is not None]
        if sum(1 for i in rows if co_units[i]) < 5:
            return self.co_ratio_
        proba = softmax(self.scores_from_components({k: (v[rows] if k != "known" else v) for k, v in comp.items()}))
        codes = self.codes
        best = (-1.0, self.co_ratio_)
        for ratio in np.linspace(0.1, 1.0, 19):
            tp = fp = fn = 0
            for p, i in zip(proba, rows, strict=True):
                order = np.argsort(-p)
                lead = codes[order[0]]
                chosen = {codes[j] for j in order[1:3] if p[j] >= ratio * p[order[0]]}
                gold = set(co_units[i]) - {lead}
                tp += len(chosen & gold)
                fp += len(chosen - gold)
                fn += len(gold - chosen)
            f1 = 2 * tp / max(2 * tp + fp + fn, 1)
            if f1 > best[0] + 1e-9:
                best = (f1, float(ratio))
        self.co_stats_ = {"f1": best[0]}
        return best[1]

    # ----------------------------------------------------------------------------------- inference
    def predict_proba(self, texts, X, emb, sources=None) -> np.ndarray:
        """(n, U) probabilities over ``self.codes``."""
        sources = [None] * len(texts) if sources is None else list(sources)
        return softmax(self.scores_from_components(self.components(texts, X, emb, sources)))

    def rank(self, texts, X, emb, sources=None) -> list[RouteResult]:
        proba = self.predict_proba(texts, X, emb, sources)
        return [self.result_from_proba(p) for p in proba]

    def result_from_proba(self, p: np.ndarray) -> RouteResult:
        codes = self.codes
        order = np.argsort(-p, kind="stable")
        ranked = [(codes[j], float(p[j])) for j in order]
        lead_p = ranked[0][1]
        units = [ranked[0][0]] + [c for c, q in ranked[1:3] if q >= self.co_ratio_ * lead_p]
        return RouteResult(units=units, ranking=ranked)

    def compact(self) -> UnitRouter:
        self.model_.keep_sources([self.default_source] if self.default_source else [])
        self.model_.compact()
        return self


@dataclass
class RouteResult:
    units: list[str]  # the dispatch list: lead first, then co-units close to it
    ranking: list[tuple[str, float]]  # every catalog unit, best first, with its probability

    def top(self, k: int) -> list[str]:
        return [c for c, _ in self.ranking[:k]]


def entropy(p: np.ndarray) -> float:
    p = np.asarray(p)
    return float(-(p * np.log(np.maximum(p, 1e-12))).sum() / math.log(max(len(p), 2)))
