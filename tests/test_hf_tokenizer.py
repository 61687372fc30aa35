"""Hugging Face tokenizer folders (tokenizer.json + tokenizer_config.json [+ generation_config.json]), built
offline in code, behave as HF's own tokenizer does by default; Tessera's own tokenizer.json is unchanged."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from train.config import ConfigError
from train.data.prepare import tokenized
from train.objectives import make_objective
from train.recipes import load_config
from train.tokenizer import SPECIAL_TOKENS, ByteTokenizer, load_tokenizer, train_bpe

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Naïve café owners sing and dance.\nThey were singing.",
         "def main():\n    return 42  # ünïcödé ✓"]
SAMPLES = ["The cafe sings the fox.", "Naïve\ncafé singing, running!", "x = 1  # ✓"]


def write_folder(folder: Path, tok, config: dict, generation: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> Path:
    """Byte-level BPE whose post-processor adds <|begin_of_text|>; an instruct model's two stop ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos, eot = (tok.token_to_id(t) for t in specials)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True,
              "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": "{{ bos_token }}{{ messages }}"}
    generation = {"bos_token_id": bos, "eos_token_id": [eot, eos]}  # as Llama 3 instruct lists them
    return write_folder(tmp_path_factory.mktemp("llama3"), tok, config, generation)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "the", "sing", "##ing", "##s", "fox",
             "run", "##ning", "cafe", "naive", "x", "=", "1", "#"]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.add_special_tokens(vocab[:5])
    config = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]",
              "unk_token": "[UNK]", "do_lower_case": True, "tokenizer_class": "BertTokenizer"}
    return write_folder(tmp_path_factory.mktemp("bert"), tok, config)


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory) -> Path:
    """Llama 2 style: BPE over ▁-marked words, <0x00>..<0xFF> for anything else, <s> added first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "c"), ("a", "f"), ("▁c", "af")]
    for piece in [*"▁abcdefghijklmnopqrstuvwxyzTé.,", *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    bos = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False, "special": True}  # older files write special tokens as dicts
    config = {"bos_token": bos, "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    return write_folder(tmp_path_factory.mktemp("spm"), tok, config)


def hf_reference(folder: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", ["llama3", "bert", "sentencepiece"])
def test_encodings_equal_hf_defaults(name, request):
    folder = request.getfixturevalue(name)
    hf, tok = hf_reference(folder), load_tokenizer(str(folder / "tokenizer.json"))
    for text in SAMPLES:
        assert tok.encode(text).tolist() == hf(text)["input_ids"], (name, text)
        assert tok.decode(tok.encode(text)) == hf.decode(hf(text)["input_ids"], skip_special_tokens=True)
    assert [e.tolist() for e in tok.encode_batch(SAMPLES)] == [hf(t)["input_ids"] for t in SAMPLES]


def test_llama3_style_begins_with_bos_and_stops_on_either_id(llama3):
    tok = load_tokenizer(str(llama3 / "tokenizer.json"))
    vocab = tok._tok.get_vocab()
    bos, eos, eot = vocab["<|begin_of_text|>"], vocab["<|end_of_text|>"], vocab["<|eot_id|>"]
    ids = tok.encode(SAMPLES[1])
    assert ids[0] == bos
    assert tok.eod_id == eos and tok.pad_id == eos and tok.special == {"<eod>": eos}
    assert tok.stop_ids == (eos, eot)
    assert tok.chat_template == "{{ bos_token }}{{ messages }}"
    assert b"".join(tok.token_byte_strings[i] for i in ids) == SAMPLES[1].encode()  # BOS stands for no bytes
    # Each document starts with BOS and ends with the eos appended by packing.
    a, c = tok.encode("a b").tolist(), tok.encode("c").tolist()
    assert a[0] == c[0] == bos and [t.tolist() for t in tokenized(tok, ["a b", "c"])] == [[*a, eos], [*c, eos]]


def test_bert_style_maps_the_mlm_roles_and_word_pieces(bert):
    tok = load_tokenizer(str(bert / "tokenizer.json"))
    vocab = tok._tok.get_vocab()
    assert tok.special == {"<pad>": 0, "<mask>": 4, "<cls>": 2, "<sep>": 3, "<eod>": 3}
    assert tok.eod_id == 3 and tok.pad_id == 0 and tok.stop_ids == (3,)  # no eos_token: [SEP] ends a document
    ids = tok.encode("Singing foxes")
    assert ids[0] == 2 and ids[-1] == 3
    strings = tok.token_byte_strings
    assert strings[vocab["##ing"]] == b"ing" and strings[vocab["sing"]] == b" sing"
    assert all(strings[i] == b"" for i in range(5))
    # The encoding already ends with [SEP], the end of document: packing adds no second one.
    docs = [tok.encode("the fox"), tok.encode("run")]
    assert [t.tolist() for t in tokenized(tok, ["the fox", "run"])] == [d.tolist() for d in docs]
    objective = make_objective(load_config(None, ["model=tiny-mlm", f"data.tokenizer={bert / 'tokenizer.json'}"]), tok)
    assert (objective.mask_id, objective.cls_id) == (4, 2) and {0, 3} <= set(objective.special_ids)


def test_byte_fallback_pieces_are_their_bytes(sentencepiece):
    tok = load_tokenizer(str(sentencepiece / "tokenizer.json"))
    vocab = tok._tok.get_vocab()
    assert tok.token_byte_strings[vocab["<0x0A>"]] == b"\n" and tok.token_byte_strings[vocab["▁the"]] == b" the"
    assert tok.eod_id == vocab["</s>"] and tok.stop_ids == (tok.eod_id,) and tok.chat_template is None
    text = "Naïve\ncafé"
    ids = tok.encode(text)
    assert ids[0] == vocab["<s>"] and vocab["<0x0A>"] in ids and vocab["<0xC3>"] in ids  # "\n" and "ï" fall back
    # Every byte of the text, plus the space SentencePiece puts before the first word (decoding strips it).
    assert b"".join(tok.token_byte_strings[i] for i in ids) == b" " + text.encode()
    assert int(tok.token_bytes[ids].sum()) == len(text.encode()) + 1


def test_tessera_tokenizers_are_unchanged(tmp_path):
    tok = train_bpe(TEXTS * 3, 300, tmp_path / "tokenizer.json")
    text = SAMPLES[1]
    assert not tok.from_hf and tok.chat_template is None
    assert tok.encode(text).tolist() == tok._tok.encode(text, add_special_tokens=False).ids  # nothing added
    assert set(tok.special) == set(SPECIAL_TOKENS) and tok.eod_id == tok.special["<eod>"]
    assert tok.pad_id == tok.special["<pad>"] and tok.stop_ids == (tok.eod_id,)
    assert b"".join(tok.token_byte_strings[i] for i in tok.encode(text)) == text.encode()
    byte = ByteTokenizer()
    assert byte.stop_ids == (byte.eod_id,) and byte.chat_template is None


def test_a_malformed_tokenizer_config_is_refused(llama3, tmp_path):
    for name in ("tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_bytes((llama3 / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
               "<|end_header_id|>\n\n{% endif %}")


def test_an_hf_chat_template_is_rendered_turn_by_turn_as_transformers_renders_it(llama3, tmp_path):
    from tokenizers import Tokenizer

    from train.data.chat import ChatTemplate

    folder = tmp_path / "chat"
    shutil.copytree(llama3, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA3_CHAT}))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The fox?"},
                {"role": "assistant", "content": "It jumps."}, {"role": "user", "content": "And the dog?"},
                {"role": "assistant", "content": "Lazy."}]
    tok = load_tokenizer(str(folder / "tokenizer.json"))
    template = ChatTemplate(tok)
    tokens, marks = template.encode(messages)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf = hf_reference(folder)
    assert raw.decode(tokens.tolist(), skip_special_tokens=False) == hf.apply_chat_template(messages, tokenize=False)
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)  # no token was added
    learned = raw.decode(tokens[marks > 0].tolist(), skip_special_tokens=False)
    assert learned == "It jumps.<|eot_id|>Lazy.<|eot_id|>"  # the answers, each ended by a stop token
    prompt = template.prompt(messages[:2])
    rendered = hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.tolist() == hf(rendered, add_special_tokens=False)["input_ids"]  # as transformers tokenizes it
