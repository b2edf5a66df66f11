"""Plain functions behind `hotline triage`, `hotline eval` and `hotline bench triage`."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from triage.pipeline import Triager


def _texts(lines: Iterable[str]) -> Iterable[str]:
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                yield str(json.loads(line).get("text", ""))
                continue
            except ValueError:
                pass
        yield line


def triage_stream(triager: Triager, inp: IO[str], out: IO[str], batch: int = 32) -> int:
    """One message per line (or JSON lines with "text") in, one contract JSON object per line out."""
    n, buf = 0, []
    for text in _texts(inp):
        buf.append(text)
        if len(buf) >= batch:
            n += _flush(triager, buf, out)
            buf = []
    if buf:
        n += _flush(triager, buf, out)
    return n


def _flush(triager: Triager, texts: list[str], out: IO[str]) -> int:
    for r in triager.triage_many(texts):
        out.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    out.flush()
    return len(texts)


def evaluate_file(triager: Triager, path: Path) -> dict[str, Any]:
    """Per-class precision/recall/F1, confusion matrix, routing top-1/top-3, emergency recall."""
    from sklearn.metrics import classification_report, confusion_matrix

    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    results = triager.triage_many([r["text"] for r in rows])
    report: dict[str, Any] = {"n": len(rows)}
    typed = [(r["type"], res.type) for r, res in zip(rows, results, strict=True)
             if r.get("type") and res.verdict == "accept"]
    if typed:
        y, p = zip(*typed, strict=True)
        labels = sorted(set(y) | set(p))
        report["types"] = classification_report(y, p, labels=labels, output_dict=True, zero_division=0)
        report["confusion"] = {"labels": labels, "matrix": confusion_matrix(y, p, labels=labels).tolist()}
    routed = [(r["units"], res.units) for r, res in zip(rows, results, strict=True)
              if r.get("units") and res.verdict == "accept"]
    if routed:
        report["routing_top1"] = sum(g[0] in p[:1] for g, p in routed) / len(routed)
        report["routing_top3"] = sum(g[0] in p[:3] for g, p in routed) / len(routed)
    em = [(r, res) for r, res in zip(rows, results, strict=True) if "verdict" in r or "expect" in r]
    gold_em = [res for r, res in em if (r.get("verdict") or r.get("expect")) == "emergency"]
    gold_not = [res for r, res in em if (r.get("verdict") or r.get("expect")) != "emergency"]
    if gold_em:
        report["emergency_recall"] = sum(res.verdict == "emergency" for res in gold_em) / len(gold_em)
    if gold_not:
        report["false_alarm_rate"] = sum(res.verdict == "emergency" for res in gold_not) / len(gold_not)
    return report


BENCH_TEXTS = [
    "幸福路的路灯坏了一个星期了，晚上黑漆漆的，附近小区的老人晚上出门散步看不清路，希望有关部门尽快派人来修一下，谢谢。",
    "我是外地来这边打工的，想问一下在县城办理居住证需要准备哪些材料，租房合同可以吗？要不要单位开证明？去哪里办？",
    "小区门口的烧烤摊每天晚上占道经营到凌晨两点，油烟和噪音特别大，家里老人孩子都睡不好，反映过好几次了没人管。",
    "我们村的自来水已经停了两天了，全村一百多户人家都没水用，也没有任何通知，请问什么时候能恢复供水？",
    "建议在人民公园南门增设一个公交站台，现在最近的站要走二十分钟，老年人去公园锻炼很不方便，希望采纳。",
    "举报城东那家饭店后厨卫生条件很差，我亲眼看到他们用过期的肉，还没有健康证的人在切菜，请市场监管部门查一查。",
    "公司拖欠我们十几个人三个月的工资了，老板一直说下个月发，现在电话也不接了，我们该怎么办，能不能帮我们讨薪？",
    "医保异地就医备案怎么办理？我老家在渠县，现在在成都带孙子，看病能不能直接结算，需要在网上办还是回去办？",
]


def bench_triage(n: int = 200) -> dict[str, Any]:
    """Latency of one message (after warm-up) and batch throughput, with peak memory."""
    triager = Triager.load()
    triager.triage_many(BENCH_TEXTS)  # warm-up: model load, jieba, caches
    lat = []
    for i in range(n):
        text = f"{i}号反映：" + BENCH_TEXTS[i % len(BENCH_TEXTS)]  # a fresh text each time: no cache hits
        t0 = time.perf_counter()
        triager.triage(text)
        lat.append((time.perf_counter() - t0) * 1000)
    lat.sort()
    batch = [f"批次{i}：" + BENCH_TEXTS[i % len(BENCH_TEXTS)] for i in range(256)]
    t0 = time.perf_counter()
    triager.triage_many(batch)
    rate = len(batch) / (time.perf_counter() - t0)
    return {
        "messages": n,
        "mean_chars": round(statistics.mean(len(t) for t in BENCH_TEXTS), 1),
        "p50_ms": round(lat[len(lat) // 2], 1),
        "p95_ms": round(lat[int(len(lat) * 0.95) - 1], 1),
        "batch_msgs_per_s": round(rate, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main_stream() -> int:  # pragma: no cover - wired to the CLI
    return triage_stream(Triager.load(), sys.stdin, sys.stdout)
