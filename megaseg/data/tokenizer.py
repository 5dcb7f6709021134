"""Load a tokenizer from a local Hugging Face directory or a GGUF file. Never from the hub.

`model.tokenizer` may name
- a directory with tokenizer.json / tokenizer_config.json (a chat_template.jinja beside them is picked up),
- a .gguf file (its vocabulary, merges, special tokens and chat template are read by transformers' GGUF loader),
- a directory holding exactly one .gguf file and no tokenizer files.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model.tokenizer={str(path)!r} is a file but not a .gguf file; give a GGUF file or a "
                             "directory with tokenizer.json / tokenizer_config.json")
        return _load_gguf(path)
    if not path.is_dir():
        raise ValueError(f"model.tokenizer={str(path)!r} does not exist; give a local tokenizer directory or GGUF "
                         "file (megaseg never downloads from the hub)")
    if any((path / name).is_file() for name in _HF_TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    gguf_files = sorted(path.glob("*.gguf"))
    if len(gguf_files) == 1:
        return _load_gguf(gguf_files[0])
    if gguf_files:
        raise ValueError(f"model.tokenizer={str(path)!r} holds several GGUF files {[p.name for p in gguf_files]}; "
                         "name one of them")
    raise ValueError(f"model.tokenizer={str(path)!r} has no tokenizer files ({list(_HF_TOKENIZER_FILES)}) and no "
                     ".gguf file")


def _load_gguf(path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of the added tokens marked special (control tokens such as <|im_end|>, never produced from plain text)."""
    return frozenset(token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special)


def padding_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id written on padding: the tokenizer's pad token, or its EOS when it defines none (Llama-3).

    Padding is masked out of attention, losses and scores, so the id only has to be a valid embedding row.
    """
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer defines neither a pad token nor an EOS token; pass pad_id explicitly")
