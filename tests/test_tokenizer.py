import pytest

from lance_core.tokenizer import SPECIAL_TOKENS, ByteTokenizer, QwenTokenizer, load_tokenizer


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "<|im_start|>user\nhéllo <|vision_start|><|image_pad|><|vision_end|><|im_end|>"
    ids = tok.encode(text)
    assert tok.special.image_pad in ids and tok.special.im_start == ids[0]
    assert tok.decode(ids, skip_special=False) == text
    assert tok.decode(ids) == "user\nhéllo "
    assert len(tok) == 256 + len(SPECIAL_TOKENS)


def _save_tiny_qwen_style_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
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
