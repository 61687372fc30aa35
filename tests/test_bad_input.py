"""A table of bad input: each is refused with one line naming the problem, exit code 2, no traceback,
and nothing already on disk is changed."""

import json
import shutil

import pytest

from infra.cli import main
from tests.conftest import TINY_DATA, TINY_MODEL, refused

TINY = [*TINY_MODEL, *TINY_DATA]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------ config

CONFIG_CASES = {
    "unknown key": (["model.n_layer=2"], ["unknown config key model.n_layer", "n_layers"]),
    "unknown section": (["trainer.steps=2"], ["unknown config key trainer"]),
    "wrong type": (["train.steps=lots"], ["train.steps='lots'", "integer"]),
    "wrong type bool": (["model.tie_embeddings=maybe"], ["model.tie_embeddings='maybe'", "boolean"]),
    "negative size": (["model.d_model=-8"], ["model.d_model=-8", "greater than or equal to 1"]),
    "zero steps": (["train.steps=0"], ["train.steps=0"]),
    "bad choice": (["model.remat=some"], ["model.remat='some'", "'none', 'full' or 'save_dots'"]),
    "heads vs kv heads": (["model.n_kv_heads=3"], ["model.n_heads=4", "model.n_kv_heads=3"]),
    "heads vs tensor": (["mesh.tensor=8"], ["mesh.tensor=8"]),
    "batch vs data axes": (["mesh.data=8", "data.batch_size=12"], ["data.batch_size=12", "mesh.data*mesh.fsdp*mesh.expert=8"]),
    "batch vs microbatches": (["train.microbatches=3"], ["train.microbatches=3"]),
    "seq longer than model": (["data.seq_len=128"], ["data.seq_len=128", "model.max_seq_len=64"]),
    "two fill axes": (["mesh.data=-1", "mesh.fsdp=-1"], ["only one mesh axis may be -1"]),
    "mesh vs devices": (["mesh.data=2", "mesh.fsdp=2"], ["multiply to 4 but there are 8 devices"]),
    "mesh cannot fill": (["mesh.data=-1", "mesh.tensor=3", "model.n_heads=6", "model.n_kv_heads=3", "model.d_model=48"],
                         ["mesh.data=-1 cannot fill 8 devices", "(mesh.tensor=3) multiply to 3"]),
    "fsdp larger than the devices": (["mesh.data=-1", "mesh.fsdp=3", "data.batch_size=9"],
                                     ["mesh.data=-1 cannot fill 8 devices", "mesh.fsdp=3"]),
    "unknown preset": (["model=gpt5"], ["model preset 'gpt5' not found", "llama3-8b"]),
    "unknown mesh axis in rules": (["mesh.rules={embed: pipeline}"], ["mesh.rules.embed='pipeline'",
                                                                       "mesh axes of data, fsdp, expert, tensor"]),
    "misspelt logical axis in rules": (["mesh.rules={embd: null}"], ["mesh.rules.embd: no such logical axis",
                                                                     "embed", "activation_embed"]),
    "mesh axis twice in a rule": (["mesh.rules={mlp: [tensor, tensor]}"], ["mesh.rules.mlp", "distinct"]),
    "text source without paths": (["data.source=text"], ["data.paths is empty"]),
    "top_k over experts": (["model.moe={num_experts: 4, top_k: 5}"], ["model.moe.top_k=5", "num_experts=4"]),
    "expert axis vs experts": (["model.moe={num_experts: 6, top_k: 2}", "mesh.expert=4", "mesh.data=2"],
                               ["mesh.expert=4 must divide model.moe.num_experts=6"]),
    "masked tokens on a decoder": (["train.objective=masked_tokens"],
                                   ["train.objective='masked_tokens' needs model.architecture='encoder'"]),
}


@pytest.mark.parametrize("name", CONFIG_CASES)
def test_config_refusals(capsys, workdir, name):
    overrides, expected = CONFIG_CASES[name]
    defaults = ["mesh.data=1"] if not any(o.startswith("mesh.") for o in overrides) else []
    refused(capsys, ["train", *TINY, *defaults, *overrides, "run.dir=run"], *expected)
    assert not (workdir / "run").exists()


def test_missing_config_file(capsys, workdir):
    refused(capsys, ["train", "nope.yaml"], "config file nope.yaml does not exist")


def test_invalid_yaml(capsys, workdir):
    (workdir / "bad.yaml").write_text("model: [unclosed\n")
    refused(capsys, ["train", "bad.yaml"], "bad.yaml is not valid YAML")


def test_yaml_that_is_not_a_mapping(capsys, workdir):
    (workdir / "list.yaml").write_text("- 1\n- 2\n")
    refused(capsys, ["train", "list.yaml"], "must hold a mapping")


def test_malformed_override(capsys, workdir):
    refused(capsys, ["train", "missing-equals.yaml", "train.steps"], "config file missing-equals.yaml does not exist")
    (workdir / "ok.yaml").write_text("train: {steps: 3}\n")
    refused(capsys, ["train", "ok.yaml", "=3"], "must look like key.path=value")


# ------------------------------------------------------------ data


def run_with(*overrides):
    return ["train", *TINY_MODEL, "data.seq_len=32", "data.batch_size=8", "mesh.data=-1", "run.dir=run", *overrides]


def test_missing_data_path(capsys, workdir):
    refused(capsys, run_with("data.source=text", f"data.paths=[{workdir}/none.txt]"), "none.txt' does not exist")
    assert not (workdir / "run").exists()


def test_empty_glob(capsys, workdir):
    refused(capsys, run_with("data.source=text", f"data.paths=[{workdir}/*.md]"), "matched no files")


def test_only_empty_files(capsys, workdir):
    for i in range(3):
        (workdir / f"e{i}.txt").write_text("  \n")
    refused(capsys, run_with("data.source=text", f"data.paths=[{workdir}/*.txt]"), "no usable documents", "'empty': 3")


def test_jsonl_with_nothing_usable(capsys, workdir):
    (workdir / "d.jsonl").write_text('not json\n{"body": "x"}\n')
    refused(capsys, run_with("data.source=jsonl", f"data.paths=[{workdir}/d.jsonl]"),
            "no usable documents", "data.text_field='text'")


def test_too_few_documents_for_a_heldout_split(capsys, workdir):
    (workdir / "a.txt").write_text("only one document")
    refused(capsys, run_with("data.source=text", f"data.paths=[{workdir}/a.txt]"), "out of 1; both need at least one")


def test_per_record_problems_are_skipped_and_counted(workdir, capsys):
    for i in range(60):
        (workdir / f"doc{i}.txt").write_text(f"document number {i} " * 20)
    (workdir / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))  # not UTF-8
    (workdir / "empty.txt").write_text("")
    long_doc = "x = 1\n" * 200  # far longer than one 32-token row: split across rows, not refused
    (workdir / "long.txt").write_text(long_doc)
    code = main(run_with("data.source=text", f"data.paths=[{workdir}/*.txt]", "train.steps=2", "train.eval_batches=1",
                         "data.heldout_fraction=0.1"))
    assert code == 0, capsys.readouterr().err
    first = json.loads((workdir / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["data_skipped_invalid_utf8"] == 1 and first["data_skipped_empty"] == 1


# ------------------------------------------------------------ tokenizer


def test_missing_tokenizer(capsys, workdir):
    refused(capsys, run_with("data.tokenizer=nope/tokenizer.json"), "no such file", "tessera tokenizer train")


def test_corrupt_tokenizer(capsys, workdir):
    (workdir / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    refused(capsys, run_with("data.tokenizer=tokenizer.json"), "is not a valid tokenizer.json")


def test_mlm_with_a_tokenizer_that_has_no_mask_token(capsys, workdir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<eod>": 2}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<eod>"])
    tok.save(str(workdir / "tokenizer.json"))
    refused(capsys, run_with("model.architecture=encoder", "data.tokenizer=tokenizer.json"),
            "has no <mask> or <cls> token", "tessera tokenizer train")


def test_vocab_smaller_than_tokenizer(capsys, workdir):
    refused(capsys, run_with("model.vocab_size=100"), "model.vocab_size=100 is smaller than the tokenizer's 264")


# ------------------------------------------------------------ run directories and checkpoints


@pytest.fixture(scope="module")
def finished_run_template(tmp_path_factory):
    template = tmp_path_factory.mktemp("finished") / "run"
    assert main([*run_with("train.steps=2", "train.eval_batches=1", "checkpoint.every=2"), f"run.dir={template}"]) == 0
    return template


@pytest.fixture
def finished_run(workdir, finished_run_template):
    """A copy of a finished 2-step run at ./run (moving a run directory is allowed)."""
    shutil.copytree(finished_run_template, workdir / "run")
    return workdir / "run"


def test_directory_that_is_not_a_run(capsys, workdir):
    (workdir / "empty_dir").mkdir()
    refused(capsys, ["train", "empty_dir"], "is a directory without config.yaml")


def test_checkpoint_of_another_model_shape(capsys, finished_run):
    refused(capsys, run_with("model.d_model=64"), "different model (model.d_model: 32 -> 64)", watch=finished_run)


def test_vocab_change_against_a_checkpoint(capsys, finished_run):
    refused(capsys, run_with("model.vocab_size=300"), "different model (model.vocab_size: 264 -> 300)", watch=finished_run)


def test_changed_config_needs_force(capsys, finished_run):
    refused(capsys, run_with("optimizer.lr=0.01"), "different config (optimizer.lr", "--force", watch=finished_run)
    assert main([*run_with("optimizer.lr=0.01", "train.steps=3", "train.eval_batches=1", "checkpoint.every=2"), "--force"]) == 0


def test_no_readable_checkpoint(capsys, finished_run):
    for p in (finished_run / "checkpoints").rglob("*"):
        if p.is_file() and p.suffix != ".json" and "METADATA" not in p.name:
            p.write_bytes(b"")
    refused(capsys, run_with("train.steps=4", "train.eval_batches=1", "checkpoint.every=2"), "none of the checkpoints [", "can be read")


# ------------------------------------------------------------ command line


def test_unknown_command(capsys):
    refused(capsys, ["trian"], "invalid choice: 'trian'")


def test_unknown_flag(capsys):
    refused(capsys, ["train", "--fast"], "unrecognized arguments: --fast")


def test_tokenizer_train_needs_vocab_size(capsys):
    refused(capsys, ["tokenizer", "train"], "--vocab-size")


def test_no_command(capsys):
    refused(capsys, [], "the following arguments are required: command")
