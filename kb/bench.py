"""Latency of one knowledge-base search with a large knowledge base loaded.

The seed entries are padded to ``n_entries`` with synthetic entries made by recombining seed phrasings (the
first half of one entry's question joined to the second half of another's, under a place name). A synthetic
phrasing's (and entry profile's) vector is the normalised sum of its two sources' vectors plus a little noise, unless
``exact_embeddings`` asks to embed every synthetic phrasing (slow: thousands of encoder calls). Either way
each timed search embeds its query with the real encoder, which is most of the cost.

    .venv/bin/python -m kb.bench --entries 5000
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from kb.evaluation import EVAL_PATH, default_encoder, load_entries, load_eval
from kb.io import SEED_PATH
from kb.retrieval import QUERY_PREFIX, Encoder, KnowledgeIndex, VectorCache, entry_profile

PLACES = (
    "城关镇",
    "东城街道",
    "西城街道",
    "南山社区",
    "北苑小区",
    "新华路",
    "河西村",
    "滨江花园",
    "开发区",
    "火车站",
)


def synthesize(
    entries: list[dict[str, Any]], n_entries: int, seed: int = 12345
) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
    """``entries`` padded to ``n_entries``; also (text, source a, source b) for every synthetic phrasing and
    entry profile, to mix their vectors from."""
    rng = random.Random(seed)
    pool = [(e, q) for e in entries for q in e.get("questions") or []]
    out = list(entries)
    sources: list[tuple[str, str, str]] = []
    number = 90000
    while len(out) < n_entries and pool:
        number += 1
        (ea, _), (eb, _) = rng.choice(pool), rng.choice(pool)
        questions = []
        for _ in range(3):
            qa, qb = rng.choice(ea["questions"]), rng.choice(eb["questions"])
            text = f"{rng.choice(PLACES)}{qa[: max(1, len(qa) // 2)]}{qb[len(qb) // 2 :]}"
            if text not in questions:
                questions.append(text)
                sources.append((text, qa, qb))
        out.append(
            {
                "id": f"kb-{number}",
                "unit": ea.get("unit", ""),
                "questions": questions,
                "answer": ea.get("answer", ""),
                "basis": ea.get("basis", ""),
                "tags": list(dict.fromkeys([*(ea.get("tags") or []), *(eb.get("tags") or [])])),
                "status": "published",
                "valid_from": None,
                "valid_to": None,
            }
        )
        profile = entry_profile(questions, ea.get("answer", ""))
        sources.append((profile, _profile_of(ea), _profile_of(eb)))
    return out, sources


def _profile_of(entry: dict[str, Any]) -> str:
    return entry_profile(entry.get("questions") or [], str(entry.get("answer") or ""))


def _mix(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    v = a + b + rng.normal(0, 0.02, size=a.shape)
    return (v / np.linalg.norm(v)).astype(np.float32)


def bench_kb(
    n_entries: int = 5000,
    *,
    encoder: Encoder | None = None,
    kb_path: Path | str = SEED_PATH,
    eval_path: Path | str = EVAL_PATH,
    n_queries: int = 300,
    exact_embeddings: bool = False,
) -> dict[str, Any]:
    """p50/p95/p99 milliseconds of ``KnowledgeIndex.search(query, k=3)`` (query embedding included)."""
    encoder = encoder or default_encoder()
    seed_entries = load_entries(kb_path)
    entries, sources = synthesize(seed_entries, n_entries)

    started = time.perf_counter()
    seed_index = KnowledgeIndex.build(seed_entries, encoder, disk_cache=VectorCache.default(encoder))
    index = KnowledgeIndex(encoder)
    vectors = seed_index.embeddings()
    index.add_embeddings(vectors)
    if not exact_embeddings:
        rng = np.random.default_rng(0)
        index.add_embeddings({text: _mix(vectors[a], vectors[b], rng) for text, a, b in sources})
    index.refresh(entries)
    build_seconds = time.perf_counter() - started

    path = Path(eval_path)
    queries = [str(i["question"]) for i in load_eval(path)] if path.exists() else []
    queries = queries or [q for e in seed_entries for q in e.get("questions") or []]
    queries = (queries * (n_queries // max(len(queries), 1) + 1))[:n_queries]
    for q in queries[:5]:
        index.search(q, k=3)  # warm caches (tokenizer, encoder threads)
    # the encoder's own cache of repeated texts would hide the embedding cost: bypass it
    uncached = getattr(encoder, "encode_uncached", None)
    total, embed = [], []
    for q in queries:
        t0 = time.perf_counter()
        if uncached is not None:
            vector = np.asarray(uncached([q], prefix=QUERY_PREFIX), dtype=np.float32)[0]
        else:
            vector = index.embed_query(q)
        t1 = time.perf_counter()
        index.search(q, k=3, vector=vector)
        t2 = time.perf_counter()
        embed.append(t1 - t0)
        total.append(t2 - t0)
    ms = np.asarray(total) * 1000
    em = np.asarray(embed) * 1000
    return {
        "entries": len(index),
        "phrasings": sum(len(e["questions"]) for e in entries),
        "queries": len(queries),
        "build_seconds": round(build_seconds, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
        "embed_p50_ms": round(float(np.percentile(em, 50)), 2),
        "search_only_p95_ms": round(float(np.percentile(ms - em, 95)), 2),
        "exact_embeddings": exact_embeddings,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark knowledge-base search latency")
    parser.add_argument("--entries", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--exact-embeddings", action="store_true")
    args = parser.parse_args(argv)
    result = bench_kb(args.entries, n_queries=args.queries, exact_embeddings=args.exact_embeddings)
    print(json.dumps(result, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
