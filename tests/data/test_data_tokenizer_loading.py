"""Tokenizer loading from local paths, checked against llama.cpp's golden tokenizer vectors."""
import pytest

from megaseg.data import tokenizer as tokenizer_module
from megaseg.data.tokenizer import load_tokenizer, padding_token_id

from material import SHARED_DATA, SHARED_TOKENIZERS, shared_file, shared_tokenizer_dir, smollm2_gguf_path

VECTORS = SHARED_TOKENIZERS / "llamacpp-test-vectors"
SEPARATOR = "\n__ggml_vocab_test__\n"


def golden_vectors(vocab_name):
    """llama.cpp's test files: inputs end with the separator line; the .out file has one id list per input."""
    inputs_path = VECTORS / f"ggml-vocab-{vocab_name}.gguf.inp"
    outputs_path = VECTORS / f"ggml-vocab-{vocab_name}.gguf.out"
    shared_file(str(inputs_path.relative_to(SHARED_DATA)))  # fails with the reason when absent
    inputs = inputs_path.read_text(encoding="utf-8").split(SEPARATOR)
    assert inputs[-1] == ""
    outputs = outputs_path.read_text(encoding="utf-8").split("\n")
    assert outputs[-1] == ""
    inputs, outputs = inputs[:-1], outputs[:-1]
    assert len(inputs) == len(outputs) == 46
    return [(text, [int(token) for token in line.split()]) for text, line in zip(inputs, outputs)]


@pytest.mark.parametrize("directory, vocab_name", [("llama3-hf", "llama-bpe"), ("phi-3", "phi-3"),
                                                   ("qwen2", "qwen2"), ("gpt-2", "gpt-2")])
def test_base_tokenizers_match_llama_cpp_golden_vectors(directory, vocab_name):
    tokenizer = load_tokenizer(shared_tokenizer_dir(directory))
    mismatches = [(text, expected, tokenizer(text, add_special_tokens=False)["input_ids"])
                  for text, expected in golden_vectors(vocab_name)
                  if tokenizer(text, add_special_tokens=False)["input_ids"] != expected]
    assert mismatches == []


def test_gguf_tokenizer_encodes_plain_text(smollm2_tokenizer):
    # SmolLM2's vocabulary, by hand: "Hello" 19556, " there" 665, "." 30; <|im_start|> 1, <|im_end|> 2.
    assert smollm2_tokenizer("Hello there.", add_special_tokens=False)["input_ids"] == [19556, 665, 30]
    assert smollm2_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert padding_token_id(smollm2_tokenizer) == 2  # the GGUF names <|im_end|> as padding


def test_padding_id_falls_back_to_eos_when_no_pad_token(llama3_tokenizer, phi3_tokenizer):
    assert llama3_tokenizer.pad_token_id is None and padding_token_id(llama3_tokenizer) == 128001
    assert padding_token_id(phi3_tokenizer) == 32000  # its own pad token <|endoftext|>


def test_path_resolution(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(tokenizer_module, "_load_gguf", lambda path: loaded.append(path) or "gguf tokenizer")
    gguf = smollm2_gguf_path()
    assert load_tokenizer(gguf) == "gguf tokenizer"
    assert load_tokenizer(gguf.parent) == "gguf tokenizer"  # a directory holding one GGUF and no tokenizer files
    assert loaded == [gguf, gguf]
    # phi-3/ holds both tokenizer.json and a vocab-only GGUF: the HF files win.
    assert load_tokenizer(shared_tokenizer_dir("phi-3")).convert_tokens_to_ids("<|end|>") == 32007

    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"several GGUF files \['a.gguf', 'b.gguf'\]"):
        load_tokenizer(tmp_path)
