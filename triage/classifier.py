"""The request-type model: a scikit-learn Pipeline over jieba words, character n-grams and e5 sentence embeddings.

``build_type_pipeline()`` gives ``Pipeline([("features", TextFeatures), ("clf", SourceAdapted(SetSoftmax))])``.
It is fitted on raw texts, predicts on raw texts and pickles with joblib. The encoder is never pickled: the
embedding step asks ``triage.embedding.get_encoder()`` for it, and that encoder keeps an LRU of recent texts, so
the router's request for the same message is a cache hit (``Triager`` goes further and hands both models the
same feature matrix).

Pieces:

* ``TextFeatures`` — jieba word TF-IDF + character 1-3-gram TF-IDF + the e5 embedding, one sparse matrix.
* ``SetSoftmax`` — multinomial logistic regression whose labels may be SETS of acceptable classes: the loss of a
  row is ``-log sum_{c in S} p(c|x)``. A clean label is a one-element set; 佳木斯's 反映问题 is {help,
  complaint, report, suggestion}.
* ``SourceAdapted`` — "frustratingly easy" domain adaptation (Daumé 2007): each training row's features are
  copied into a shared block and into its source's block, so every source (a message board, the product corpus,
  a deployment's own tickets) keeps its own labelling conventions while sharing what is common. Because the
  source block is the row itself, scoring with source ``s`` is ``X @ (W_shared + W_s)``: the shipped model keeps
  one merged matrix for its default source and is no larger than a plain linear model.
* ``TypeModel`` helpers: prior offsets tuned for macro-F1, the temperature, and the ambiguity rule
  (``needs_review`` when the top probability or the gap to the runner-up is below thresholds chosen on
  held-out data and stored with the model).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.optimize
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import f1_score
from sklearn.pipeline import Pipeline

from triage.tokenizer import tokenize

log = logging.getLogger(__name__)

TYPES = ("consultation", "help", "complaint", "report", "suggestion")


# --------------------------------------------------------------------------------------------------- encoder
_encode_override = None


def set_encode_function(fn) -> None:
    """Replace the encoder call ``fn(texts, max_chars) -> (n, dim) float32`` (evaluation plugs in a disk cache of
    the data rows here); ``None`` restores ``triage.embedding.get_encoder()``."""
    global _encode_override
    _encode_override = fn


def embed(texts: Sequence[str], max_chars: int | None = None) -> np.ndarray:
    """L2-normalised e5 vectors with the ``query: `` prefix (the encoder truncates at its max_seq_length)."""
    texts = [t[:max_chars] if max_chars else t for t in texts]
    if _encode_override is not None:
        return np.asarray(_encode_override(texts, max_chars), dtype=np.float32)
    from triage.embedding import get_encoder

    return get_encoder().encode(texts, prefix="query: ")


class EmbeddingTransformer(TransformerMixin, BaseEstimator):
    """Raw texts -> e5 sentence embeddings (dense float32). Stateless: fit() learns nothing."""

    def __init__(self, max_chars: int | None = None):
        self.max_chars = max_chars

    def fit(self, X, y=None):
        return self

    def transform(self, X) -> np.ndarray:
        return embed(list(X), self.max_chars)


class TextFeatures(TransformerMixin, BaseEstimator):
    """jieba word TF-IDF + character n-gram TF-IDF + e5 embedding (each block L2-normalised, then weighted) as
    one sparse float32 matrix. ``transform_parts`` also returns the embeddings, so callers reuse them."""

    def __init__(
        self,
        word_weight: float = 1.0,
        char_weight: float = 1.0,
        emb_weight: float = 2.0,
        char_ngram: tuple[int, int] = (1, 3),
        min_df: int = 2,
        char_max_features: int | None = 20_000,
        word_max_features: int | None = 20_000,
        max_chars: int | None = None,
    ):
        self.word_weight = word_weight
        self.char_weight = char_weight
        self.emb_weight = emb_weight
        self.char_ngram = char_ngram
        self.min_df = min_df
        self.char_max_features = char_max_features
        self.word_max_features = word_max_features
        self.max_chars = max_chars

    def fit(self, X, y=None):
        texts = list(X)
        self.word_ = TfidfVectorizer(
            analyzer=tokenize,
            sublinear_tf=True,
            min_df=self.min_df,
            max_features=self.word_max_features,
            dtype=np.float32,
        ).fit(texts)
        self.char_ = TfidfVectorizer(
            analyzer="char",
            ngram_range=tuple(self.char_ngram),
            sublinear_tf=True,
            min_df=self.min_df,
            max_features=self.char_max_features,
            dtype=np.float32,
        ).fit(texts)
        # the fitted vocabularies are all we need; stop_words_ holds every pruned term (megabytes)
        self.word_.stop_words_ = None
        self.char_.stop_words_ = None
        self.embedding_ = EmbeddingTransformer(self.max_chars)
        return self

    @property
    def n_features(self) -> int:
        return len(self.word_.vocabulary_) + len(self.char_.vocabulary_) + (384 if self.emb_weight else 0)

    def sparse_part(self, texts: Sequence[str]) -> sp.csr_matrix:
        texts = list(texts)
        blocks = [self.word_.transform(texts) * self.word_weight, self.char_.transform(texts) * self.char_weight]
        return sp.hstack(blocks, format="csr", dtype=np.float32)

    def combine(self, sparse_part: sp.csr_matrix, embeddings: np.ndarray | None) -> sp.csr_matrix:
        if not self.emb_weight:
            return sparse_part
        dense = sp.csr_matrix(np.asarray(embeddings, dtype=np.float32) * self.emb_weight)
        return sp.hstack([sparse_part, dense], format="csr", dtype=np.float32)

    def transform_parts(self, X, embeddings: np.ndarray | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
        texts = list(X)
        if embeddings is None:
            embeddings = self.embedding_.transform(texts)
        return self.combine(self.sparse_part(texts), embeddings), embeddings

    def transform(self, X) -> sp.csr_matrix:
        return self.transform_parts(X)[0]


# --------------------------------------------------------------------------------------------------- models
def softmax(z: np.ndarray) -> np.ndarray:
    z = np.array(z, dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.array(z, dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def as_label_sets(y) -> list[tuple]:
    """Labels or tuples of acceptable labels -> tuples."""
    return [tuple(label) if isinstance(label, (tuple, list, set, frozenset)) else (label,) for label in y]


def membership(sets: Sequence[tuple], classes: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros((len(sets), len(classes)), dtype=bool)
    for i, s in enumerate(sets):
        for c in s:
            j = index.get(c)
            if j is not None:
                out[i, j] = True
    return out


class SetSoftmax(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression with set-valued labels, fitted by L-BFGS.

    ``C``: inverse L2 strength as in sklearn (loss summed over rows + 0.5*||W||^2). ``class_weight``: None,
    "balanced" (from single-label rows) or a dict; a set-labelled row takes the mean weight of its set.
    ``classes``: the full class list (a class without rows still gets a column).
    """

    def __init__(self, C: float = 1.0, class_weight=None, classes=None, max_iter: int = 200, tol: float = 1e-5):
        self.C = C
        self.class_weight = class_weight
        self.classes = classes
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X, y, sample_weight=None):
        sets = as_label_sets(y)
        classes = list(self.classes) if self.classes is not None else sorted({c for s in sets for c in s})
        member = membership(sets, classes)
        keep = np.flatnonzero(member.any(1))
        X = sp.csr_matrix(X, dtype=np.float64)[keep]
        member = member[keep]
        n, d = X.shape
        k = len(classes)
        w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=float)[keep]
        cw = self._class_weights(member)
        w = w * (member * cw).sum(1) / member.sum(1)
        XT = X.T.tocsr()
        reg = 1.0 / self.C

        def objective(theta):
            W = theta[: d * k].reshape(d, k)
            z = X @ W + theta[d * k :]
            z -= z.max(axis=1, keepdims=True)
            ez = np.exp(z)
            tot = ez.sum(1)
            inset = np.maximum((ez * member).sum(1), 1e-300)
            loss = float((w * (np.log(tot) - np.log(inset))).sum()) + 0.5 * reg * float((W * W).sum())
            g = (ez / tot[:, None] - ez * member / inset[:, None]) * w[:, None]
            return loss, np.concatenate([(XT @ g + reg * W).ravel(), g.sum(0)])

        res = scipy.optimize.minimize(
            objective,
            np.zeros(d * k + k),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": self.max_iter, "gtol": self.tol},
        )
        self.coef_ = res.x[: d * k].reshape(d, k).T.astype(np.float32)  # (k, d) like sklearn
        self.intercept_ = res.x[d * k :].astype(np.float32)
        self.classes_ = np.array(classes)
        self.n_iter_ = int(res.nit)
        return self

    def _class_weights(self, member: np.ndarray) -> np.ndarray:
        k = member.shape[1]
        if self.class_weight is None:
            return np.ones(k)
        if isinstance(self.class_weight, dict):
            return np.array([float(self.class_weight.get(c, 1.0)) for c in self.classes_or(member)])
        single = member[member.sum(1) == 1]
        counts = single.sum(0).astype(float)
        present = counts > 0
        cw = np.ones(k)
        cw[present] = single.shape[0] / (present.sum() * counts[present])
        return np.sqrt(cw) if self.class_weight == "sqrt" else cw

    def classes_or(self, member):
        return list(self.classes) if self.classes is not None else [str(i) for i in range(member.shape[1])]

    def decision_function(self, X) -> np.ndarray:
        return np.asarray(X @ self.coef_.T + self.intercept_, dtype=np.float64)

    def predict_proba(self, X) -> np.ndarray:
        return softmax(self.decision_function(X))

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


class SourceAdapted(ClassifierMixin, BaseEstimator):
    """Wrap a linear classifier (``coef_`` (k, d), ``intercept_``) with per-source feature copies.

    ``fit(X, y, sources=[...])``: rows whose source is in ``self.sources`` also fill that source's block.
    Scoring with ``source=s`` uses ``W_shared + W_s``; ``source=None`` uses ``default_source`` (or the shared part
    alone when that is None too). ``keep_sources`` drops the other blocks before the model is shipped.
    """

    def __init__(self, estimator, sources: Sequence[str] = (), default_source: str | None = None):
        self.estimator = estimator
        self.sources = sources
        self.default_source = default_source

    def augment(self, X, sources: Sequence[str | None]) -> sp.csr_matrix:
        X = sp.csr_matrix(X)
        blocks = [X]
        src = np.asarray([s if s is not None else "" for s in sources])
        for s in self.sources:
            blocks.append(sp.diags((src == s).astype(np.float32)) @ X)
        return sp.hstack(blocks, format="csr", dtype=np.float32)

    def fit(self, X, y, sources=None, sample_weight=None):
        if sources is None:
            sources = [None] * X.shape[0]
        est = clone(self.estimator)
        kwargs = {} if sample_weight is None else {"sample_weight": sample_weight}
        est.fit(self.augment(X, sources), y, **kwargs)
        d = X.shape[1]
        coef = np.asarray(est.coef_, dtype=np.float32)
        self.classes_ = np.asarray(est.classes_)
        self.shared_coef_ = coef[:, :d].copy()
        self.source_coef_ = {s: coef[:, d * (j + 1) : d * (j + 2)].copy() for j, s in enumerate(self.sources)}
        self.intercept_ = np.asarray(est.intercept_, dtype=np.float32).reshape(-1)
        self.n_features_in_ = d
        return self

    def keep_sources(self, keep: Sequence[str]) -> SourceAdapted:
        """Drop the blocks of sources not in ``keep`` (the shipped model only needs its default source)."""
        self.source_coef_ = {s: w for s, w in self.source_coef_.items() if s in keep}
        self.sources = tuple(s for s in self.sources if s in keep)
        return self

    def coef_for(self, source: str | None = None) -> np.ndarray:
        source = source if source is not None else self.default_source
        cache = self.__dict__.setdefault("_merged", {})
        if source not in cache:
            extra = self.source_coef_.get(source) if source else None
            merged = self.shared_coef_.astype(np.float32)  # the shipped weights are float16 (compact())
            if extra is not None:
                merged = merged + extra.astype(np.float32)
            # (d, k) float32 like X: a float16 matrix would be converted on every product (~2 ms a message)
            cache[source] = np.ascontiguousarray(merged.T)
        return cache[source]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_merged", None)
        return state

    def decision_function(self, X, source: str | None = None) -> np.ndarray:
        return np.asarray(X @ self.coef_for(source) + self.intercept_, dtype=np.float64)

    def decision_function_by_source(self, X, sources: Sequence[str | None]) -> np.ndarray:
        out = np.empty((X.shape[0], len(self.classes_)))
        src = np.asarray([s if s is not None else "" for s in sources], dtype=object)
        for s in set(src.tolist()):
            rows = np.flatnonzero(src == s)
            out[rows] = self.decision_function(X[rows], s or None)
        return out

    def predict(self, X, source: str | None = None) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X, source), axis=1)]

    def compact(self, dtype=np.float16) -> SourceAdapted:
        """Store the weights in half precision (the artifact stays a few MB); scoring casts back."""
        self.shared_coef_ = self.shared_coef_.astype(dtype)
        self.source_coef_ = {s: w.astype(dtype) for s, w in self.source_coef_.items()}
        self.__dict__.pop("_merged", None)
        return self


class TypeClassifier(ClassifierMixin, BaseEstimator):
    """The request-type head: ``SourceAdapted(SetSoftmax)`` plus calibration and the ambiguity rule.

    ``predict_proba`` = softmax(decision / temperature + offsets[source]): the temperature is fitted on held-out
    log loss; the offsets (a prior shift per source, tuned on that source's held-out macro-F1) keep minority types
    (求助, 建议) from being drowned by 咨询/投诉. ``review_top_`` / ``review_gap_``: the ambiguity thresholds.
    """

    def __init__(
        self,
        C: float = 4.0,
        class_weight="balanced",
        sources: Sequence[str] = (),
        default_source: str | None = None,
        max_iter: int = 200,
    ):
        self.C = C
        self.class_weight = class_weight
        self.sources = sources
        self.default_source = default_source
        self.max_iter = max_iter

    def fit(self, X, y, sources=None, sample_weight=None):
        base = SetSoftmax(C=self.C, class_weight=self.class_weight, classes=TYPES, max_iter=self.max_iter)
        self.model_ = SourceAdapted(base, sources=tuple(self.sources), default_source=self.default_source)
        self.model_.fit(X, y, sources=sources, sample_weight=sample_weight)
        self.classes_ = self.model_.classes_
        if not hasattr(self, "temperature_"):
            self.set_tuned_state({})
        return self

    # ---- tuned state (learned on a dev split, carried over when the model is refitted on all rows)
    def tuned_state(self) -> dict:
        return {
            "temperature_": self.temperature_,
            "offsets_": dict(self.offsets_),
            "review_top_": self.review_top_,
            "review_gap_": self.review_gap_,
            "review_stats_": dict(self.review_stats_),
        }

    def set_tuned_state(self, state: dict) -> None:
        self.temperature_ = float(state.get("temperature_", 1.0))
        self.offsets_ = dict(state.get("offsets_", {}))
        self.review_top_ = float(state.get("review_top_", 0.0))
        self.review_gap_ = float(state.get("review_gap_", 0.0))
        self.review_stats_ = dict(state.get("review_stats_", {}))

    def raw(self, X, source: str | None = None, sources=None) -> np.ndarray:
        if sources is not None:
            return self.model_.decision_function_by_source(X, sources)
        return self.model_.decision_function(X, source)

    def _offsets(self, source: str | None) -> np.ndarray:
        source = source if source is not None else self.default_source
        return np.asarray(self.offsets_.get(source, np.zeros(len(self.classes_))))

    def proba_from_raw(self, raw: np.ndarray, sources=None, source: str | None = None) -> np.ndarray:
        z = raw / self.temperature_
        if sources is None:
            z = z + self._offsets(source)
        else:
            z = z + np.stack([self._offsets(s) for s in sources])
        return softmax(z)

    def predict_proba(self, X, source: str | None = None) -> np.ndarray:
        return self.proba_from_raw(self.raw(X, source), source=source)

    def predict(self, X, source: str | None = None) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X, source), axis=1)]

    def needs_review(self, proba: np.ndarray) -> np.ndarray:
        top, gap = ambiguity(proba)
        return (top < self.review_top_) | (gap < self.review_gap_)

    # ---- held-out tuning (training.py calls these on a dev split, never on test folds)
    def calibrate(self, raw: np.ndarray, y_sets, sources: Sequence[str], min_rows: int = 40) -> TypeClassifier:
        """Temperature on all held-out rows (set-valued log loss); then, per source with at least ``min_rows``
        single-type held-out rows, the prior offsets that maximise that source's macro-F1."""
        sets = as_label_sets(y_sets)
        self.temperature_ = fit_temperature(raw, sets, list(self.classes_))
        self.offsets_ = {}
        for s in sorted(set(sources)):
            rows = [i for i, (src, lab) in enumerate(zip(sources, sets, strict=True)) if src == s and len(lab) == 1]
            if len(rows) < min_rows or len({sets[i][0] for i in rows}) < len(self.classes_):
                continue
            z = raw[rows] / self.temperature_
            self.offsets_[s] = tune_offsets_macro_f1(z, [sets[i][0] for i in rows], list(self.classes_))
        return self

    def choose_review_thresholds(self, proba: np.ndarray, y: Sequence[str], max_flagged: float = 0.2):
        """The (top, gap) pair that maximises accuracy on the unflagged rows while flagging at most
        ``max_flagged`` of them; ties go to the one flagging fewer."""
        y = np.asarray(y)
        right = self.classes_[np.argmax(proba, 1)] == y
        top, gap = ambiguity(proba)
        best = (float(right.mean()), 0.0, 0.0, 0.0)
        for t in np.linspace(0.2, 0.7, 26):
            for g in np.linspace(0.0, 0.4, 21):
                flag = (top < t) | (gap < g)
                frac = float(flag.mean())
                if frac > max_flagged or flag.all():
                    continue
                acc = float(right[~flag].mean())
                if acc > best[0] + 1e-9 or (abs(acc - best[0]) <= 1e-9 and frac < best[3]):
                    best = (acc, float(t), float(g), frac)
        self.review_top_, self.review_gap_ = best[1], best[2]
        self.review_stats_ = {"accuracy_all": float(right.mean()), "accuracy_unflagged": best[0], "flagged": best[3]}
        return self

    def compact(self) -> TypeClassifier:
        keep = [self.default_source] if self.default_source else []
        self.model_.keep_sources(keep)
        self.offsets_ = {s: o for s, o in self.offsets_.items() if s in keep}
        return self


def fit_temperature(raw: np.ndarray, sets: Sequence[tuple], classes: Sequence[str]) -> float:
    member = membership(sets, classes)
    ok = member.any(1)
    raw, member = raw[ok], member[ok]

    def nll(log_t):
        lp = log_softmax(raw / np.exp(log_t[0]))
        return -float(np.log(np.maximum((np.exp(lp) * member).sum(1), 1e-300)).mean())

    res = scipy.optimize.minimize(nll, np.zeros(1), method="L-BFGS-B", bounds=[(-4.0, 4.0)])
    return float(np.exp(res.x[0]))


def tune_offsets_macro_f1(z: np.ndarray, y: Sequence[str], classes: Sequence[str], rounds: int = 3) -> np.ndarray:
    """Per-class additive log-offsets by coordinate ascent on macro-F1 (class 0 fixed at 0), shrunk toward 0 on
    ties so a flat objective keeps the calibrated prior."""
    classes = list(classes)
    y = list(y)
    off = np.zeros(len(classes))
    grid = np.round(np.linspace(-2.0, 2.0, 41), 3)

    def score(o):
        pred = [classes[j] for j in np.argmax(z + o, 1)]
        return f1_score(y, pred, average="macro", labels=classes, zero_division=0)

    best = score(off)
    for _ in range(rounds):
        changed = False
        for c in range(1, len(classes)):
            for g in sorted(grid, key=abs):
                trial = off.copy()
                trial[c] = g
                s = score(trial)
                if s > best + 1e-6:
                    best, off, changed = s, trial, True
        if not changed:
            break
    return off


def ambiguity(proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top probability and the gap between the two best, per row."""
    part = np.sort(np.asarray(proba), axis=1)
    return part[:, -1], part[:, -1] - part[:, -2]


def build_type_pipeline(features: TextFeatures | None = None, **params) -> Pipeline:
    """The type model as one Pipeline on raw text: ``fit(texts, label_sets, clf__sources=...)``."""
    return Pipeline([("features", features or TextFeatures()), ("clf", TypeClassifier(**params))])
