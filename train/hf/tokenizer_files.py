"""The tokenizer files of a Hugging Face model folder: copied into a run directory on import, and written beside
an export (copied back when the run's tokenizer came from HF; built from Tessera's own otherwise)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from train.tokenizer import SPECIAL_TOKENS, BpeTokenizer, byte_level_alphabet, load_tokenizer

TOKENIZER_DIR = "tokenizer"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                      "chat_template.jinja")


def copy_tokenizer(source: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in HF_TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)


def _byte_tokenizer_json(path: Path) -> None:
    """Tessera's byte tokenizer as a tokenizer.json: ids 0-255 the bytes (in byte-level BPE's printable stand-ins,
    no merges), the special tokens after them in Tessera's order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for char, byte in byte_level_alphabet().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(path))


def write_tokenizer(spec: str, out: Path) -> dict:
    """Tokenizer files for the run's `data.tokenizer` in `out`; -> the token ids config.json names."""
    tokenizer = load_tokenizer(spec)
    if isinstance(tokenizer, BpeTokenizer) and tokenizer.from_hf:
        copy_tokenizer(tokenizer.path.parent, out)
    else:
        if isinstance(tokenizer, BpeTokenizer):
            shutil.copyfile(tokenizer.path, out / "tokenizer.json")
        else:
            _byte_tokenizer_json(out / "tokenizer.json")
        names = {"<eod>": "eos_token", "<pad>": "pad_token", "<mask>": "mask_token", "<cls>": "cls_token",
                 "<sep>": "sep_token"}
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  **{key: token for token, key in names.items() if token in tokenizer.special}}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "generation_config.json").write_text(
            json.dumps({"eos_token_id": tokenizer.eod_id, "pad_token_id": tokenizer.pad_id}, indent=2) + "\n")
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eod_id, "pad_token_id": tokenizer.pad_id}
