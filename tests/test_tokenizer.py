import json
import pickle

import pytest

from lance_core import tokenizer as tokenizer_module
from lance_core.config import ConfigError, model_preset
from lance_core.tokenizer import (
    QWEN25_ADDED_TOKENS,
    QWEN25_VOCAB,
    SPECIAL_TOKENS,
    ByteTokenizer,
    Qwen25Tokenizer,
    QwenTokenizer,
    check_tokenizer_fits,
    load_tokenizer,
    load_tokenizer_for,
    qwen25_ranks_file,
)


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "<|im_start|>user\nhéllo <|vision_start|><|image_pad|><|vision_end|><|im_end|>"
    ids = tok.encode(text)
    assert tok.special.image_pad in ids and tok.special.im_start == ids[0]
    assert tok.decode(ids, skip_special=False) == text
    assert tok.decode(ids) == "user\nhéllo "
    assert len(tok) == 256 + len(SPECIAL_TOKENS)


def _save_tiny_qwen_style_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend)
    fast.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    fast.save_pretrained(path)


def test_qwen_tokenizer_from_a_local_folder(tmp_path):
    _save_tiny_qwen_style_tokenizer(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, QwenTokenizer)
    ids = tok.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == tok.special.im_start and ids[-1] == tok.special.im_end
    assert tok.decode(ids) == "hi"


def test_missing_tokenizer_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------ the built-in Qwen2.5 tokenizer
needs_dashscope = pytest.mark.skipif(qwen25_ranks_file() is None,
                                     reason="the dashscope package (qwen.tiktoken) is not installed")


@pytest.fixture(scope="module")
def qwen():
    if qwen25_ranks_file() is None:
        pytest.skip("the dashscope package (qwen.tiktoken) is not installed")
    tok = load_tokenizer(None)
    assert isinstance(tok, Qwen25Tokenizer)
    return tok


@pytest.fixture(scope="module")
def release_text(shared_dir):
    folder = shared_dir / "fixtures" / "lance_release"
    positions = json.loads((folder / "positions.json").read_text())
    prompts = json.loads((folder / "system_prompts.json").read_text())
    spans = [(layout["name"], span) for layout in positions["layouts"] for span in layout["spans"]
             if span["kind"] == "text"]
    return positions, prompts, spans


def test_qwen25_ids_equal_the_release_for_every_text_span(qwen, release_text):
    _, _, spans = release_text
    assert len(spans) > 50
    for layout, span in spans:
        assert qwen.encode(span["text"]) == span["ids"], (layout, span["text"])
        assert qwen.decode(span["ids"], skip_special=False) == span["text"], (layout, span["ids"])


def test_qwen25_system_prompt_lengths_equal_the_release(qwen, release_text):
    _, prompts, _ = release_text
    assert len(prompts["tasks"]) >= 10
    for task in prompts["tasks"]:
        ids = qwen.encode(task["text"])
        assert len(ids) == task["qwen_tokens"], (task["task"], task["path"])
        assert qwen.decode(ids) == task["text"]
    for name, texts in prompts["candidates"].items():
        for text in texts:
            assert qwen.decode(qwen.encode(text)) == text, name


def test_qwen25_special_tokens_and_length(qwen, release_text):
    positions, _, _ = release_text
    assert len(qwen) == QWEN25_VOCAB == 151_665
    named = {"<|endoftext|>": "endoftext", "<|im_start|>": "im_start", "<|im_end|>": "im_end",
             "<|vision_start|>": "vision_start", "<|vision_end|>": "vision_end", "<|image_pad|>": "image_pad",
             "<|video_pad|>": "video_pad"}
    for text, token_id in positions["token_ids"].items():
        assert getattr(qwen.special, named[text]) == token_id
        assert qwen.encode(text) == [token_id]
    for index, (text, _) in enumerate(QWEN25_ADDED_TOKENS):
        assert qwen.encode(text) == [151_643 + index]
    assert qwen.encode("<|vision_pad|>") == [151_654]


def test_qwen25_known_ids_nfc_and_decode(qwen):
    chat = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert qwen.encode(chat) == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.encode("cafe\u0301") == qwen.encode("caf\u00e9")  # NFC before BPE
    text = "<|im_start|>user\nhéllo 世界 <|vision_start|><|image_pad|><|vision_end|><tool_call>x<|im_end|>"
    ids = qwen.encode(text)
    assert qwen.decode(ids, skip_special=False) == text
    # special tokens are dropped, the non-special added ones (tool call, FIM) stay text
    assert qwen.decode(ids) == "user\nhéllo 世界 <tool_call>x"
    assert qwen.decode([9707, QWEN25_VOCAB, 151_935, 1879]) == "Hello world"  # rows past len() dropped
    assert pickle.loads(pickle.dumps(qwen)).encode(text) == ids


def test_byte_fallback_only_without_dashscope_and_says_so(monkeypatch, lance_log):
    monkeypatch.setattr(tokenizer_module, "qwen25_ranks_file", lambda: None)
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer)
    said = lance_log.getvalue()
    assert "dashscope" in said and "byte-level" in said
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert lance_log.getvalue() == said


def test_ranks_file_with_another_hash_is_refused(tmp_path):
    bad = tmp_path / "qwen.tiktoken"
    bad.write_bytes(b"IQ== 0\n")
    with pytest.raises(ValueError, match="sha256"):
        Qwen25Tokenizer(bad)


@needs_dashscope
def test_the_model_picks_a_tokenizer_its_rows_hold():
    tiny, big = model_preset("tiny"), model_preset("lance-3b")
    assert isinstance(load_tokenizer_for(tiny), ByteTokenizer)
    assert isinstance(load_tokenizer_for(big), Qwen25Tokenizer)
    assert isinstance(load_tokenizer_for(big, "byte"), ByteTokenizer)
    assert isinstance(load_tokenizer_for(model_preset("tiny", vocab_size=151_936)), Qwen25Tokenizer)
    with pytest.raises(ConfigError, match="vocab_size"):
        load_tokenizer_for(tiny, "qwen2.5")
    with pytest.raises(ConfigError, match="151665 ids"):
        check_tokenizer_fits(tiny, "qwen2.5")
    check_tokenizer_fits(big, "qwen2.5")


def test_train_config_refuses_a_builtin_tokenizer_the_model_cannot_hold():
    from pipelines.train.config import load_train_config

    assert load_train_config({"model": {"preset": "lance-3b"}}).model.tokenizer is None  # Qwen2.5 built in
    load_train_config({"model": {"preset": "tiny", "tokenizer": "byte"}})
    load_train_config({"model": {"preset": "tiny", "tokenizer": "qwen2.5", "overrides": {"vocab_size": 151_936}}})
    with pytest.raises(ConfigError, match="raise vocab_size"):
        load_train_config({"model": {"preset": "tiny", "tokenizer": "qwen2.5"}})
