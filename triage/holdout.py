"""A held-out check of the triage model on the labelled real data (`python -m triage.holdout`).

Splits each real source 80/20 (seeded), trains on the corpus plus the 80 %, and scores the 20 %: Teddy
Cup domain accuracy of the top unit (right when it belongs to the domain), 大连 type macro-F1 on the
five types, routing top-1/top-3 on mapped 大连 + 佳木斯 letters. One fold of the issue's 5-fold protocol.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

from sklearn.metrics import f1_score

from triage import trainer
from triage.pipeline import Triager


def split(rows: list, seed: int, frac: float = 0.2) -> tuple[list, list]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    k = int(len(rows) * frac)
    return rows[k:], rows[:k]


def holdout(data_dir: Path = trainer.DEFAULT_DATA, seed: int = 0) -> dict:
    real = trainer.load_real(data_dir)
    train_real, test_real = {}, {}
    for key, rows in real.items():
        train_real[key], test_real[key] = split(rows, seed)
    original = trainer.load_real
    trainer.load_real = lambda _d: train_real  # train on the 80 % only
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer.train(Path(tmp), data_dir, seed=seed)
            t = Triager.load(Path(tmp))
            model = t.model
            out: dict = {"seed": seed}
            texts = [x for x, _ in test_real["types"]]
            pred = [str(p) for p in model["type_model"].predict(texts)]
            out["dalian_type_macro_f1"] = round(f1_score([y for _, y in test_real["types"]], pred,
                                                         average="macro"), 4)
            units = t.unit_scores([x for x, _ in test_real["units"]])
            codes = model["unit_codes"]
            ranks = [[codes[j] for j in row.argsort()[::-1][:3]] for row in units]
            gold = [u for _, u in test_real["units"]]
            out["routing_top1"] = round(sum(g == r[0] for g, r in zip(gold, ranks, strict=True)) / len(gold), 4)
            out["routing_top3"] = round(sum(g in r for g, r in zip(gold, ranks, strict=True)) / len(gold), 4)
            dom = t.unit_scores([x for x, _ in test_real["domains"]])
            top = [codes[row.argmax()] for row in dom]
            out["teddy_domain_acc"] = round(sum(u in s for u, (_, s) in zip(top, test_real["domains"], strict=True))
                                            / len(top), 4)
            out["n_test"] = {k: len(v) for k, v in test_real.items()}
            return out
    finally:
        trainer.load_real = original


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(holdout(seed=int(sys.argv[1]) if len(sys.argv) > 1 else 0), ensure_ascii=False))
