"""Hybrid retrieval over the answerable knowledge base: jieba BM25 + sentence embeddings, fused and re-ranked.

1. Candidates. Semantic: the query's embedding against every phrasing of every entry (best phrasing) and
   against one vector per entry (its phrasings and answer as one text), averaged; every text is embedded with
   the "query: " prefix. Lexical: BM25 over jieba words (``triage.tokenizer.tokens``) plus the characters of
   each word, so that "房本" still meets "房产证" and a typo ("公基金") still meets "公积金". The two rankings are
   fused by reciprocal rank into one candidate pool.
2. Re-rank. ``Scorer.rank``: a weighted sum of the semantic score and two saturated BM25 scores (phrasings
   and tags; phrasings, tags and answer), weights fitted pairwise on the dev split (``kb.evaluation``).
3. Confidence. ``Scorer.confidence``: a logistic function of the hit's semantic score, its semantic lead over
   the next entry and its re-rank lead over the next candidate, fitted on dev to tell right answers from
   wrong ones. Below ``Scorer.threshold`` (tuned on dev) there is no answer: a wrong answer is worse than
   none, and the request becomes a ticket (平利 第八条: 不能即时答复的，转派至承办单位办理).

Only published entries inside their validity dates answer (平利 第八条, 大连 第十六条); dates are checked again
at query time, so an entry that expires after the index was built stops answering at once.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from triage.tokenizer import tokens

QUERY_PREFIX = "query: "
CANDIDATES = 20  # per retriever, before fusion
RRF_K = 10
BM25_K1 = 1.2
BM25_B = 0.75
BM25_SATURATION = 10.0  # bm25 / (bm25 + this): scores in [0, 1)
# Words that say "this is a question" rather than what it is about.
STOPWORDS = frozenset(
    "请问 问一下 问下 咨询 一下 你好 您好 怎么 怎么办 怎样 如何 什么 哪里 哪儿 哪个 哪些 多少 多久 几 吗 呢 吧 啊 呀 的 了 "
    "着 是 在 有 要 想 我 我们 你 你们 他 她 它 这 那 这个 那个 可以 能 能不能 可不 可不可以 需要 应该 和 与 及 或 还是 就 都 也 "
    "去 到 给 被 把 对 从 谢谢 麻烦".split()
)


class Encoder(Protocol):
    def encode(self, texts: list[str], *, prefix: str = ...) -> np.ndarray: ...


@dataclass(frozen=True)
class Scorer:
    """Re-ranking weights, confidence calibration and thresholds; fitted on the dev split of
    kb/data/kb_eval.yaml by ``python -m kb.evaluation --fit`` (see the report in kb/evaluation.py)."""

    # re-rank: w_sem * semantic + w_bm25_q * bm25(phrasings) + w_bm25_full * bm25(phrasings + answer)
    w_sem: float = 102.25
    w_bm25_q: float = 4.06
    w_bm25_full: float = 4.08
    # confidence: sigmoid(c_sem * semantic + c_sem_lead * semantic lead + c_rank_lead * re-rank lead + c_bias)
    c_sem: float = 32.19
    c_sem_lead: float = 3.38
    c_rank_lead: float = 0.55
    c_bias: float = -30.05
    threshold: float = 0.9295  # answer at or above
    suggest_threshold: float = 0.1  # offer "did you mean" choices at or above (the citizen picks)

    def rank(self, sem: np.ndarray, bm25_q: np.ndarray, bm25_full: np.ndarray) -> np.ndarray:
        return self.w_sem * sem + self.w_bm25_q * bm25_q + self.w_bm25_full * bm25_full

    def confidence(self, sem: np.ndarray, sem_lead: np.ndarray, rank_lead: np.ndarray) -> np.ndarray:
        z = self.c_sem * sem + self.c_sem_lead * sem_lead + self.c_rank_lead * rank_lead + self.c_bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


DEFAULT_SCORER = Scorer()


@dataclass(frozen=True)
class Hit:
    entry_id: str
    score: float  # calibrated confidence that this entry answers the question, 0..1
    unit: str  # owning unit code
    updated_at: datetime | None
    answer: str
    basis: str
    question: str  # the entry's phrasing closest to the query
    features: dict[str, float] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class _Doc:
    entry_id: str
    unit: str
    answer: str
    basis: str
    questions: tuple[str, ...]
    tags: tuple[str, ...]
    status: str
    valid_from: date | None
    valid_to: date | None
    updated_at: datetime | None

    @classmethod
    def of(cls, entry: Any) -> _Doc:
        if isinstance(entry, dict):
            get = entry.get
        else:

            def get(key: str, default: Any = None) -> Any:
                return getattr(entry, key, default)

        return cls(
            entry_id=str(get("id")),
            unit=str(get("unit") or ""),
            answer=str(get("answer") or ""),
            basis=str(get("basis") or ""),
            questions=tuple(str(q).strip() for q in (get("questions") or []) if str(q).strip()),
            tags=tuple(str(t) for t in (get("tags") or ())),
            status=str(get("status") or "published"),
            valid_from=_date(get("valid_from")),
            valid_to=_date(get("valid_to")),
            updated_at=get("updated_at"),
        )

    @property
    def profile(self) -> str:
        return entry_profile(self.questions, self.answer)


def entry_profile(questions: Iterable[str], answer: str) -> str:
    """One text for a whole entry: its phrasings, then its answer (embedded as the entry's own vector)."""
    return "；".join(q.strip() for q in questions if q.strip()) + "。" + answer


def _date(value: Any) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value))


def _today() -> date:
    from models.clock import CHINA_TZ, now

    return now().astimezone(CHINA_TZ).date()


def lexical_terms(text: str) -> list[str]:
    """BM25 terms: jieba words without question words, each followed by its characters when longer than one."""
    out: list[str] = []
    for word in tokens(text):
        if word in STOPWORDS:
            continue
        out.append(word)
        if len(word) > 1:
            out.extend(word)
    return out


class VectorCache:
    """Embeddings of knowledge-base texts kept on disk between runs (``data_dir/cache``), one file per model,
    so that starting the bot does not re-embed every phrasing and answer."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def default(cls, encoder: Encoder) -> VectorCache:
        from models.settings import get_settings

        model = f"{getattr(encoder, 'name', type(encoder).__name__)}|{QUERY_PREFIX}"
        digest = hashlib.sha1(model.encode()).hexdigest()[:12]
        return cls(Path(get_settings().data_dir) / "cache" / f"kb-vectors-{digest}.npz")

    def load(self) -> dict[str, np.ndarray]:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                return dict(zip(data["texts"].tolist(), data["vectors"], strict=True))
        except (OSError, KeyError, ValueError):
            return {}

    def save(self, vectors: dict[str, np.ndarray]) -> None:
        if not vectors:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        texts = sorted(vectors)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp, texts=np.asarray(texts), vectors=np.stack([vectors[t] for t in texts]).astype(np.float32)
        )
        os.replace(tmp, self.path)


class KnowledgeIndex:
    """In-memory hybrid index of knowledge-base entries; searches may run while ``refresh`` rebuilds it.

    ``disk_cache``: a :class:`VectorCache` to reuse embeddings across runs (None: embed in memory only).
    """

    def __init__(
        self, encoder: Encoder, scorer: Scorer = DEFAULT_SCORER, disk_cache: VectorCache | None = None
    ) -> None:
        self.encoder = encoder
        self.scorer = scorer
        self.disk_cache = disk_cache
        self._lock = threading.Lock()
        self._cache: dict[str, np.ndarray] = disk_cache.load() if disk_cache else {}  # text -> embedding
        self._state: _State | None = None
        self.fingerprint: Any = None

    # ------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        entries: Iterable[Any],
        encoder: Encoder,
        scorer: Scorer = DEFAULT_SCORER,
        disk_cache: VectorCache | None = None,
    ) -> KnowledgeIndex:
        """Index entries (ORM ``KBEntry`` objects or dicts with the same keys); unpublished ones are left out."""
        index = cls(encoder, scorer, disk_cache)
        index.refresh(entries)
        return index

    @classmethod
    def from_session(
        cls,
        session: Any,
        encoder: Encoder,
        scorer: Scorer = DEFAULT_SCORER,
        disk_cache: VectorCache | None = None,
    ) -> KnowledgeIndex:
        """Index the database's published entries (what the bot uses)."""
        index = cls(encoder, scorer, disk_cache)
        index.refresh_from_session(session)
        return index

    def refresh(self, entries: Iterable[Any]) -> None:
        """Rebuild from the given entries; texts embedded before are not embedded again.

        Entries that are not published are dropped here; validity dates are checked at query time.
        """
        docs = [d for d in (_Doc.of(e) for e in entries) if d.status == "published" and d.questions]
        wanted = {q for d in docs for q in d.questions} | {d.profile for d in docs}
        missing = sorted(wanted - self._cache.keys())
        if missing:
            vectors = np.asarray(self.encoder.encode(missing, prefix=QUERY_PREFIX), dtype=np.float32)
            self._cache.update(zip(missing, vectors, strict=True))
            if self.disk_cache is not None:
                self.disk_cache.save({t: self._cache[t] for t in wanted})
        state = _State.build(docs, self._cache)
        with self._lock:
            self._state = state

    def refresh_from_session(self, session: Any) -> None:
        """Rebuild from the database's published entries (call after a publish, edit or retire)."""
        from kb.store import fingerprint, list_entries

        self.fingerprint = fingerprint(session)
        self.refresh(list_entries(session, status="published"))

    def ensure_fresh(self, session: Any) -> bool:
        """Refresh if any entry changed since the last refresh (one cheap query); returns whether it did."""
        from kb.store import fingerprint

        if fingerprint(session) == self.fingerprint:
            return False
        self.refresh_from_session(session)
        return True

    def add_embeddings(self, vectors: dict[str, np.ndarray]) -> None:
        """Pre-seed the text embedding cache (used by the benchmark for synthetic entries)."""
        self._cache.update(vectors)

    def embeddings(self) -> dict[str, np.ndarray]:
        """Every text embedded so far (phrasings and entry profiles) with its vector."""
        return dict(self._cache)

    def __len__(self) -> int:
        return 0 if self._state is None else len(self._state.docs)

    # ------------------------------------------------------------ searching

    def embed_query(self, query: str) -> np.ndarray:
        return np.asarray(self.encoder.encode([query], prefix=QUERY_PREFIX), dtype=np.float32)[0]

    def search(
        self, query: str, k: int = 3, *, on: date | None = None, vector: np.ndarray | None = None
    ) -> list[Hit]:
        """The ``k`` best answerable entries for ``query``, best first, each with a calibrated score."""
        state = self._state
        if state is None or not state.docs or not query.strip():
            return []
        qvec = self.embed_query(query) if vector is None else vector
        return state.search(query, qvec, k, on or _today(), self.scorer)

    def answer(self, query: str, *, on: date | None = None) -> Hit | None:
        """The best hit if its score reaches the threshold, else None (no answer: the request becomes a ticket)."""
        hits = self.search(query, k=1, on=on)
        if hits and hits[0].score >= self.scorer.threshold:
            return hits[0]
        return None

    def suggest(self, query: str, k: int = 3, *, on: date | None = None) -> list[Hit]:
        """Hits worth offering as "您是不是想问……" choices when there is no answer; the citizen picks one."""
        return [h for h in self.search(query, k=k, on=on) if h.score >= self.scorer.suggest_threshold]

    def with_scorer(self, scorer: Scorer) -> KnowledgeIndex:
        """A view of the same index with other weights or thresholds (for tuning)."""
        other = KnowledgeIndex(self.encoder, scorer)
        other.disk_cache, other._cache, other._state = self.disk_cache, self._cache, self._state
        other.fingerprint = self.fingerprint
        return other

    def with_threshold(self, threshold: float) -> KnowledgeIndex:
        return self.with_scorer(replace(self.scorer, threshold=threshold))


@dataclass
class _Bm25:
    """BM25 term weights kept as postings: term -> (doc indices, weights)."""

    vocab: dict[str, int]
    postings: list[tuple[np.ndarray, np.ndarray]]

    @classmethod
    def build(cls, doc_terms: list[list[str]]) -> _Bm25:
        vocab: dict[str, int] = {}
        rows, cols, counts = [], [], []
        lengths = np.asarray([len(t) for t in doc_terms], dtype=np.float64)
        for i, terms in enumerate(doc_terms):
            for term, count in _count(terms).items():
                rows.append(i)
                cols.append(vocab.setdefault(term, len(vocab)))
                counts.append(count)
        row = np.asarray(rows, dtype=np.int64)
        col = np.asarray(cols, dtype=np.int64)
        tf = np.asarray(counts, dtype=np.float64)
        n = max(len(doc_terms), 1)
        df = np.bincount(col, minlength=len(vocab)).astype(np.float64)
        idf = np.log(1.0 + (n - df + 0.5) / (df + 0.5))
        avgdl = max(float(lengths.mean()) if len(lengths) else 1.0, 1e-9)
        norm = BM25_K1 * (1.0 - BM25_B + BM25_B * lengths / avgdl)
        weight = (idf[col] * tf * (BM25_K1 + 1.0) / (tf + norm[row])).astype(np.float32)
        order = np.lexsort((row, col))
        bounds = np.searchsorted(col[order], np.arange(len(vocab) + 1))
        row, weight = row[order], weight[order]
        postings = [(row[a:b], weight[a:b]) for a, b in itertools.pairwise(bounds)]
        return cls(vocab, postings)

    def scores(self, terms: Iterable[str], n: int) -> np.ndarray:
        out = np.zeros(n, dtype=np.float32)
        for term in set(terms):
            j = self.vocab.get(term)
            if j is not None:
                docs, weights = self.postings[j]
                out[docs] += weights
        return out


def _count(terms: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in terms:
        counts[t] = counts.get(t, 0) + 1
    return counts


@dataclass
class _State:
    docs: list[_Doc]
    starts: np.ndarray  # first phrasing row of each doc (rows are grouped by doc)
    emb: np.ndarray  # (phrasings + docs) x dim, L2-normalised: every phrasing, then every entry profile
    n_rows: int  # number of phrasing rows
    bm25_q: _Bm25  # phrasings and tags
    bm25_full: _Bm25  # phrasings, tags and answer
    valid_from: np.ndarray  # date ordinals; 0 = open start
    valid_to: np.ndarray  # date ordinals; huge = open end

    @classmethod
    def build(cls, docs: list[_Doc], cache: dict[str, np.ndarray]) -> _State:
        starts, rows = [], []
        for doc in docs:
            starts.append(len(rows))
            rows.extend(doc.questions)
        dim = next(iter(cache.values())).shape[0] if cache else 1
        phrasing_emb = np.stack([cache[t] for t in rows]) if rows else np.zeros((0, dim))
        profile_emb = np.stack([cache[d.profile] for d in docs]) if docs else np.zeros((0, dim))
        q_terms = [lexical_terms(" ".join(d.questions + d.tags)) for d in docs]
        full_terms = [t + lexical_terms(d.answer) for t, d in zip(q_terms, docs, strict=True)]
        return cls(
            docs=docs,
            starts=np.asarray(starts, dtype=np.int64),
            emb=np.ascontiguousarray(np.vstack([phrasing_emb, profile_emb]), dtype=np.float32),
            n_rows=len(rows),
            bm25_q=_Bm25.build(q_terms),
            bm25_full=_Bm25.build(full_terms),
            valid_from=np.asarray(
                [d.valid_from.toordinal() if d.valid_from else 0 for d in docs], dtype=np.int64
            ),
            valid_to=np.asarray(
                [d.valid_to.toordinal() if d.valid_to else 10**9 for d in docs], dtype=np.int64
            ),
        )

    def search(self, query: str, qvec: np.ndarray, k: int, day: date, scorer: Scorer) -> list[Hit]:
        n = len(self.docs)
        ordinal = day.toordinal()
        allowed = (self.valid_from <= ordinal) & (ordinal <= self.valid_to)
        if not allowed.any():
            return []
        sims = _matvec(self.emb, qvec.astype(np.float32, copy=False))
        cos, profile = sims[: self.n_rows], sims[self.n_rows :]
        sem = (np.maximum.reduceat(cos, self.starts) + profile) / 2.0
        sem = np.where(allowed, sem, -np.inf)
        terms = lexical_terms(query)
        bq = self.bm25_q.scores(terms, n)
        bf = self.bm25_full.scores(terms, n)

        # fusion: reciprocal rank over the semantic and the lexical ranking -> candidate pool
        by_sem = _top(sem, CANDIDATES)
        by_bm25 = [i for i in _top(np.where(allowed, bq + bf, -np.inf), CANDIDATES) if bq[i] + bf[i] > 0]
        rrf: dict[int, float] = {}
        for ranking in (by_sem, by_bm25):
            for position, i in enumerate(ranking):
                rrf[int(i)] = rrf.get(int(i), 0.0) + 1.0 / (RRF_K + position + 1)
        cand = np.asarray(sorted(rrf, key=lambda i: -rrf[i])[: 2 * CANDIDATES], dtype=np.int64)

        # re-rank and calibrate
        c_sem = sem[cand]
        c_bq = bq[cand] / (bq[cand] + BM25_SATURATION)
        c_bf = bf[cand] / (bf[cand] + BM25_SATURATION)
        rank = scorer.rank(c_sem, c_bq, c_bf)
        rank_lead = rank - _best_other(rank)
        sem_top2 = np.sort(sem[by_sem[:2]])[::-1] if len(by_sem) >= 2 else np.asarray([sem[by_sem[0]], -1.0])
        sem_other = np.where(c_sem >= sem_top2[0], sem_top2[1], sem_top2[0])
        sem_lead = np.clip(c_sem - sem_other, -0.2, 0.2)
        confidence = scorer.confidence(c_sem, sem_lead, rank_lead)

        hits = []
        for o in np.argsort(-rank, kind="stable")[:k]:
            i = int(cand[o])
            doc = self.docs[i]
            start = int(self.starts[i])
            best_q = doc.questions[int(np.argmax(cos[start : start + len(doc.questions)]))]
            hits.append(
                Hit(
                    entry_id=doc.entry_id,
                    score=float(confidence[o]),
                    unit=doc.unit,
                    updated_at=doc.updated_at,
                    answer=doc.answer,
                    basis=doc.basis,
                    question=best_q,
                    features={
                        "sem": float(c_sem[o]),
                        "bm25_q": float(c_bq[o]),
                        "bm25_full": float(c_bf[o]),
                        "rank": float(rank[o]),
                        "rank_lead": float(rank_lead[o]),
                        "sem_lead": float(sem_lead[o]),
                    },
                )
            )
        return hits


_blas_lock = threading.Lock()
_blas: Any = None


def _matvec(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``matrix @ vector`` on one BLAS thread: for one mat-vec, threads cost more than they give, most of all
    on busy cores. The lock keeps concurrent searches from restoring the thread count out of order; torch's
    own threads are not touched."""
    global _blas
    with _blas_lock:
        if _blas is None:
            from threadpoolctl import ThreadpoolController

            _blas = ThreadpoolController().select(user_api="blas")
        with _blas.limit(limits=1):
            return matrix @ vector


def _best_other(values: np.ndarray) -> np.ndarray:
    """For each element, the largest of the other elements (-1 when there is no other)."""
    if len(values) < 2:
        return np.full_like(values, values.min() - 1.0 if len(values) else 0.0)
    top2 = np.partition(values, -2)[-2:]
    first, second = top2.max(), top2.min()
    return np.where(values >= first, second, first)


def _top(values: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.arange(len(values)) if k >= len(values) else np.argpartition(-values, k - 1)[:k]
    idx = idx[np.isfinite(values[idx])]
    return idx[np.argsort(-values[idx], kind="stable")]


def open_index(
    session: Any, encoder: Encoder | None = None, scorer: Scorer = DEFAULT_SCORER
) -> KnowledgeIndex:
    """The index the bot uses: the database's published entries, the product's encoder, and embeddings kept on
    disk between runs. Call ``index.ensure_fresh(session)`` before answering to pick up units' changes."""
    if encoder is None:
        from triage.embedding import get_encoder

        encoder = get_encoder()
    return KnowledgeIndex.from_session(session, encoder, scorer, VectorCache.default(encoder))
