"""Training data for the triage models and ``train()``, which builds and saves them.

Sources (all optional except the product's own hand-written corpus):

* ``triage/data/corpus/*.jsonl`` — shipped with the product: ``{"text", "type", "units": [lead, co...], "urgent"}``.
* ``data_dir`` (``../shared/data`` during development; a deployment points it at an export of its own tickets):
  - ``teddy2020_train.csv`` (text, domain): the domain gives a SET of acceptable units (``domain_map.csv``); it is
    used as a set-valued label (the loss is -log of the probability mass on the set), never as one unit.
  - ``dalian_train.csv`` (text, type_zh, unit_raw): the citizen's own type (咨询/投诉/举报/求助/建议; 表扬 is not
    one of the five types and is dropped from type training) and the department that replied, mapped to unit
    codes by ``unit_map.csv``; departments without a row (district governments, the hotline centre, bodies
    outside the catalog) are no evidence for routing.
  - ``jiamusi_train.csv``: unit_raw as above; its type is only 咨询问题 / 反映问题, which we use as the set
    {consultation} / {help, complaint, report, suggestion} — it tells "asks" from "reports a problem" and
    nothing finer.

The real data is read only while training and evaluating; the product ships the artifacts, never the rows.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TYPES = ("consultation", "help", "complaint", "report", "suggestion")
PROBLEM_TYPES = ("help", "complaint", "report", "suggestion")
DALIAN_TYPES = {"咨询": "consultation", "投诉": "complaint", "举报": "report", "求助": "help", "建议": "suggestion"}
JIAMUSI_TYPES = {"咨询问题": ("consultation",), "反映问题": PROBLEM_TYPES}

PACKAGE_DIR = Path(__file__).parent
CORPUS_DIR = PACKAGE_DIR / "data" / "corpus"
ARTIFACTS_DIR = PACKAGE_DIR / "artifacts"
DEFAULT_DATA_DIR = Path("../shared/data")


@dataclass
class Example:
    """One training/evaluation message with whatever labels its source gives.

    ``type_set``: acceptable request types (one for a clean label, several for a coarse one); empty = unknown.
    ``units``: acceptable unit codes (a lead-only label has one; a Teddy domain or a department that maps to
    two codes has several); empty = no routing evidence. ``lead``: the lead unit when the source names one.
    ``dept``: the normalised raw department name (a finer label than the unit; routing sums over it).
    """

    text: str
    source: str
    type_set: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    lead: str | None = None
    dept: str | None = None
    domain: str | None = None
    urgent: bool | None = None
    co_units: tuple[str, ...] = field(default_factory=tuple)

    @property
    def type(self) -> str | None:
        return self.type_set[0] if len(self.type_set) == 1 else None


def _read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def read_unit_map(data_dir: Path) -> dict[str, tuple[str, ...]]:
    return {r["unit_raw"].strip(): tuple(r["units"].split()) for r in _read_csv(Path(data_dir) / "unit_map.csv")}


def read_domain_map(data_dir: Path) -> dict[str, tuple[str, ...]]:
    return {r["domain"].strip(): tuple(r["units"].split()) for r in _read_csv(Path(data_dir) / "domain_map.csv")}


# Department names carry a place prefix (甘井子区城建局, 辽宁省大连市通信管理局) and synonyms (城建局 = 城乡建设局);
# stripping the prefix and folding synonyms gives a department label finer than the unit code.
_PLACE_PREFIX = re.compile(
    r"^(辽宁省)?(大连市|佳木斯市?)?(大连)?(中山区|西岗区|沙河口区|甘井子区|旅顺口区|金州|金普新区|普兰店区|高新区|"
    r"庄河市|瓦房店市|长海县|开发区)?"
)
_DEPT_SYNONYMS = {
    "城建局": "城乡建设局",
    "城乡建设委员会": "城乡建设局",
    "执法局": "城市管理行政执法局",
    "行政执法局": "城市管理行政执法局",
    "城市管理综合执法局": "城市管理行政执法局",
    "城市管理局": "城市管理行政执法局",
    "人社局": "人力资源和社会保障局",
    "环保局": "环境保护局",
    "工商行政管理局": "工商局",
    "地税局": "税务局",
    "地方税务局": "税务局",
    "国家税务局": "税务局",
    "住房保障中心": "住房保障局",
    "西岗区供热办": "供热办",
    "交易发证中心": "房屋交易与产权管理中心",
    "国土房屋局": "国土资源和房屋局",
    "大连地铁建设有限公司": "地铁",
    "大连地铁运营公司": "地铁",
    "大连地铁集团有限公司": "地铁",
    "中铁大连地铁五号线有限公司": "地铁",
    "公安局": "公安局",
    "金州公安局": "公安局",
}


def normalise_department(raw: str) -> str:
    """``甘井子区城建局`` -> ``城乡建设局``; unknown names come back without their place prefix."""
    raw = raw.strip()
    if raw in _DEPT_SYNONYMS:
        return _DEPT_SYNONYMS[raw]
    name = _PLACE_PREFIX.sub("", raw) or raw
    return _DEPT_SYNONYMS.get(name, name)


def load_corpus(corpus_dir: Path | None = None) -> list[Example]:
    """The product's hand-written corpus (every ``*.jsonl`` under ``triage/data/corpus``)."""
    out: list[Example] = []
    for path in sorted(Path(corpus_dir or CORPUS_DIR).glob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s:%d is not JSON; skipped", path.name, line_no)
                    continue
                text = str(row.get("text", "")).strip()
                if not text:
                    continue
                units = tuple(u for u in row.get("units") or () if u)
                rtype = row.get("type")
                out.append(
                    Example(
                        text=text,
                        source="corpus",
                        type_set=(rtype,) if rtype in TYPES else (),
                        units=units[:1],
                        lead=units[0] if units else None,
                        co_units=units[1:],
                        urgent=row.get("urgent"),
                    )
                )
    return out


def load_teddy(data_dir: Path) -> list[Example]:
    path = Path(data_dir) / "teddy2020_train.csv"
    if not path.exists():
        return []
    domains = read_domain_map(data_dir)
    return [
        Example(text=r["text"].strip(), source="teddy", units=domains.get(r["domain"].strip(), ()), domain=r["domain"])
        for r in _read_csv(path)
        if r["text"].strip()
    ]


def load_board(data_dir: Path, name: str) -> list[Example]:
    """大连 or 佳木斯 message-board rows (``name`` = "dalian" | "jiamusi")."""
    path = Path(data_dir) / f"{name}_train.csv"
    if not path.exists():
        return []
    unit_map = read_unit_map(data_dir)
    out = []
    for r in _read_csv(path):
        text = r["text"].strip()
        if not text:
            continue
        raw_type = r["type_zh"].strip()
        if name == "dalian":
            type_set = (DALIAN_TYPES[raw_type],) if raw_type in DALIAN_TYPES else ()
        else:
            type_set = JIAMUSI_TYPES.get(raw_type, ())
        unit_raw = r["unit_raw"].strip()
        units = unit_map.get(unit_raw, ())
        out.append(
            Example(
                text=text,
                source=name,
                type_set=type_set,
                units=units,
                lead=units[0] if len(units) == 1 else None,
                dept=normalise_department(unit_raw) if units else None,
            )
        )
    return out


def load_real(data_dir: Path | None) -> list[Example]:
    """All labelled real rows under ``data_dir`` (empty when the folder does not exist)."""
    if data_dir is None or not Path(data_dir).is_dir():
        return []
    data_dir = Path(data_dir)
    return load_teddy(data_dir) + load_board(data_dir, "dalian") + load_board(data_dir, "jiamusi")


# ------------------------------------------------------------------------------------------------ building
SOURCES = ("teddy", "dalian", "jiamusi", "corpus")
DEFAULT_SOURCE = "corpus"
MODEL_FILE = "triage_model.joblib"


@dataclass
class TriageModel:
    """Everything the product needs: the shared features, the type head, the router, and what was measured."""

    features: object
    type_clf: object
    router: object
    info: dict = field(default_factory=dict)

    def type_pipeline(self):
        """The type model as one sklearn Pipeline on raw text (shares the feature step with the router)."""
        from sklearn.pipeline import Pipeline

        return Pipeline([("features", self.features), ("clf", self.type_clf)])


def dev_split(examples: list[Example], fraction: float, seed: int) -> np.ndarray:
    """A fixed held-out share of each source (boolean mask), for calibration and fusion weights only."""
    rng = np.random.default_rng(seed)
    dev = np.zeros(len(examples), dtype=bool)
    by_source: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_source.setdefault(e.source, []).append(i)
    for idx in by_source.values():
        idx = np.array(idx)
        rng.shuffle(idx)
        dev[idx[: round(len(idx) * fraction)]] = True
    return dev


def fit_models(
    examples: list[Example],
    catalog: list[dict] | None = None,
    *,
    seed: int = 0,
    dev_fraction: float = 0.2,
    progress=None,
) -> TriageModel:
    """Fit features, type head and router on ``examples``; calibration, fusion weights and thresholds are learned
    on a fixed dev share of them (per source), then the supervised parts are refitted on everything."""
    from triage.classifier import TextFeatures, TypeClassifier
    from triage.routing import UnitRouter

    say = progress or (lambda msg: log.info(msg))
    if catalog is None:
        from models.catalog import read_catalog

        catalog = list(read_catalog())
    t0 = time.perf_counter()
    texts = [e.text for e in examples]
    features = TextFeatures().fit(texts)
    X, emb = features.transform_parts(texts)
    say(f"features {X.shape} in {time.perf_counter() - t0:.0f}s")
    dev = dev_split(examples, dev_fraction, seed)
    sources = [e.source for e in examples]
    present = tuple(s for s in SOURCES if s in set(sources))

    # ---- request type
    t_rows = np.array([i for i, e in enumerate(examples) if e.type_set])
    t_sets = [examples[i].type_set for i in t_rows]
    t_src = [sources[i] for i in t_rows]
    t_dev = dev[t_rows]
    type_clf = TypeClassifier(sources=present, default_source=DEFAULT_SOURCE)
    type_clf.fit(X[t_rows[~t_dev]], [t_sets[j] for j in np.flatnonzero(~t_dev)], sources=[t_src[j] for j in np.flatnonzero(~t_dev)])
    dev_idx = np.flatnonzero(t_dev)
    raw = type_clf.raw(X[t_rows[dev_idx]], sources=[t_src[j] for j in dev_idx])
    type_clf.calibrate(raw, [t_sets[j] for j in dev_idx], [t_src[j] for j in dev_idx])
    proba = type_clf.proba_from_raw(raw, [t_src[j] for j in dev_idx])
    single = [k for k, j in enumerate(dev_idx) if len(t_sets[j]) == 1]
    type_clf.choose_review_thresholds(proba[single], [t_sets[dev_idx[k]][0] for k in single])
    tuned = type_clf.tuned_state()
    say(f"type head tuned on {len(dev_idx)} dev rows in {time.perf_counter() - t0:.0f}s")
    type_clf.fit(X[t_rows], t_sets, sources=t_src)
    type_clf.set_tuned_state(tuned)

    # ---- routing
    r_rows = np.array([i for i, e in enumerate(examples) if e.units])
    r_sets = [examples[i].units for i in r_rows]
    r_src = [sources[i] for i in r_rows]
    r_dev = dev[r_rows]
    router = UnitRouter(sources=present, default_source=DEFAULT_SOURCE, seed=seed).set_catalog(catalog)
    trn = np.flatnonzero(~r_dev)
    router.fit(X[r_rows[trn]], [r_sets[j] for j in trn], [r_src[j] for j in trn])
    dv = np.flatnonzero(r_dev)
    comp = router.components([texts[r_rows[j]] for j in dv], X[r_rows[dv]], emb[r_rows[dv]], [r_src[j] for j in dv])
    co = [
        (examples[r_rows[j]].co_units if examples[r_rows[j]].source == "corpus" else None) for j in dv
    ]
    router.fit_fusion(comp, [r_sets[j] for j in dv], co)
    say(f"router fusion tuned on {len(dv)} dev rows in {time.perf_counter() - t0:.0f}s: {router.theta_.round(3)}")
    router.fit(X[r_rows], r_sets, r_src)
    info = {
        "rows": {s: sources.count(s) for s in present},
        "type_rows": len(t_rows),
        "route_rows": len(r_rows),
        "seed": seed,
        "dev_fraction": dev_fraction,
        "fusion": [round(float(v), 4) for v in router.theta_],
        "co_ratio": router.co_ratio_,
        "route_review": {"min_lead": router.review_min_, **router.review_stats_},
        "type_temperature": type_clf.temperature_,
        "review": {"top": type_clf.review_top_, "gap": type_clf.review_gap_, **type_clf.review_stats_},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return TriageModel(features=features, type_clf=type_clf, router=router, info=info)


def train(out_dir: Path | str | None = None, data_dir: Path | str | None = DEFAULT_DATA_DIR, seed: int = 0) -> dict:
    """Build both models deterministically from the product corpus plus the real data in ``data_dir`` (when the
    folder exists) and save ``triage_model.joblib`` in ``out_dir`` (default: the package's triage/artifacts).
    Returns a summary (rows per source, tuned thresholds and weights, artifact size)."""
    examples = load_corpus() + load_real(Path(data_dir) if data_dir else None)
    if not examples:
        raise ValueError("no training data: the corpus folder is empty")
    model = fit_models(examples, seed=seed)
    from triage.embedding import EncoderOptions

    # the embedding block was learnt from vectors of this many tokens; load_model warns when that changes
    model.info["embedding_max_seq_length"] = EncoderOptions().max_seq_length
    return save_model(model, out_dir)


def save_model(model: TriageModel, out_dir: Path | str | None = None) -> dict:
    import joblib

    model.type_clf.compact()
    model.router.compact()
    out = Path(out_dir or ARTIFACTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MODEL_FILE
    tmp = path.with_suffix(".tmp")
    joblib.dump(model, tmp, compress=("xz", 3))
    tmp.replace(path)
    summary = dict(model.info)
    summary["artifact"] = str(path)
    summary["size_mb"] = round(path.stat().st_size / 1e6, 2)
    return summary


def load_model(artifacts_dir: Path | str | None = None) -> TriageModel:
    import joblib

    model = joblib.load(Path(artifacts_dir or ARTIFACTS_DIR) / MODEL_FILE)
    from triage.embedding import EncoderOptions

    trained, current = model.info.get("embedding_max_seq_length"), EncoderOptions().max_seq_length
    if trained is not None and trained != current:
        log.warning(
            "the triage model was trained on %s-token embeddings, the encoder makes %s-token ones: run hotline train",
            trained,
            current,
        )
    return model
