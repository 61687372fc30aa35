import json
import subprocess
import sys

import pytest
import yaml

from model.flops import param_counts
from infra.mesh import resolve_mesh
from train.config import ConfigError, dump_config
from train.recipes import load_config
from tests.conftest import tiny_config


def error_of(*overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_default_recipe_is_the_tiny_model_on_the_stdlib():
    cfg = load_config()
    assert cfg.model.name == "tiny"
    assert cfg.data.source == "stdlib" and cfg.data.tokenizer == "byte"


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["model.n_layers=8", "train.steps=200", "mesh.fsdp=4", "run.dir=runs/x", "model.tie_embeddings=false"])
    assert cfg.model.n_layers == 8 and isinstance(cfg.model.n_layers, int)
    assert cfg.train.steps == 200 and cfg.mesh.fsdp == 4 and cfg.run.dir == "runs/x"
    assert cfg.model.tie_embeddings is False
    assert cfg.model.d_model == 128  # the rest of the preset is kept


def test_model_preset_by_name_and_bare_preset_file():
    cfg = load_config(None, ["model=llama3-8b", "data.seq_len=128"])
    assert (cfg.model.name, cfg.model.n_layers, cfg.model.n_kv_heads) == ("llama3-8b", 32, 8)
    from train.recipes import CONFIGS_DIR

    bare = load_config(CONFIGS_DIR / "models" / "gpt2-small.yaml", ["data.seq_len=128"])
    assert bare.model.name == "gpt2-small" and bare.model.position == "learned"


def test_a_model_preset_names_its_policy_and_one_key_changes_it(tmp_path):
    def preset_of(*overrides, path=None):
        return load_config(path, ["data.seq_len=64", *overrides]).precision.preset

    assert preset_of() == "fp32"  # the CPU default job
    assert preset_of("model=llama3-8b") == "bf16"  # the preset's recommendation
    assert preset_of("model=llama3-8b", "precision.preset=fp32") == "fp32"  # one key, either order
    assert preset_of("precision.preset=bf16-pure", "model=llama3-8b") == "bf16-pure"
    assert preset_of("model=llama3-8b", "model=gpt2-small") == "fp32"  # the model in the end decides, not the first
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: llama3-1b\n")
    assert preset_of(path=recipe) == "bf16" and preset_of("model=gpt2-small", path=recipe) == "fp32"
    recipe.write_text("model: {preset: llama3-1b, n_layers: 2}\nprecision: {compute: float32}\n")
    cfg = load_config(recipe, ["data.seq_len=64"])
    assert (cfg.precision.preset, cfg.precision.policy.compute, cfg.model.n_layers) == ("bf16", "float32", 2)
    bare = tmp_path / "mine"  # a preset file named without a suffix
    bare.write_text("n_layers: 2\nd_model: 64\nprecision: bf16\n")
    cfg = load_config(bare, ["data.seq_len=64"])
    assert (cfg.model.name, cfg.model.n_layers, cfg.precision.preset) == ("mine", 2, "bf16")
    from train.recipes import CONFIGS_DIR

    presets = sorted((CONFIGS_DIR / "models").glob("*.yaml"))
    assert presets and not [p.name for p in presets if "dtype" in p.read_text()]  # shapes and a policy name only


def test_recipe_with_preset_and_model_overrides(tmp_path):
    recipe = tmp_path / "exp.yaml"
    recipe.write_text("model: {preset: tiny, n_layers: 2}\ntrain: {steps: 7}\n")
    cfg = load_config(recipe, ["model.d_model=128"])
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.name, cfg.train.steps) == (2, 128, "tiny", 7)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = tiny_config("train.steps=3", tmp_path=tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "preset, total",
    [
        ("gpt2-small", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("llama3-1b", 1_235_814_400),
        ("llama3-8b", 8_030_261_248),
        ("llama3-70b", 70_553_706_496),
    ],
)
def test_preset_parameter_counts_match_published(preset, total):
    assert param_counts(load_config(None, [f"model={preset}", "data.seq_len=128"]).model).total == total


# ------------------------------------------------------------ rejections


def test_unknown_key_names_the_path_and_the_allowed_keys():
    msg = error_of("model.n_layer=3")
    assert "model.n_layer" in msg and "n_layers" in msg


def test_wrong_type_names_key_and_value():
    msg = error_of("train.steps=lots")
    assert "train.steps" in msg and "'lots'" in msg and "integer" in msg


def test_out_of_range_names_key_value_and_bound():
    msg = error_of("model.n_layers=0")
    assert "model.n_layers=0" in msg and "greater than or equal to 1" in msg


def test_heads_not_divisible_by_kv_heads():
    msg = error_of("model.n_heads=4", "model.n_kv_heads=3")
    assert "model.n_heads=4" in msg and "model.n_kv_heads=3" in msg


def test_an_encoder_has_no_sliding_window():
    msg = error_of("model.architecture=encoder", "model.sliding_window=64")
    assert "model.sliding_window" in msg and "encoder" in msg


def test_heads_not_divisible_by_tensor_axis():
    msg = error_of("model.n_heads=4", "model.n_kv_heads=4", "mesh.tensor=8", "mesh.data=1")
    assert "model.n_heads=4" in msg and "mesh.tensor=8" in msg


def test_batch_not_divisible_by_data_parallel_size():
    msg = error_of("data.batch_size=6", "mesh.data=4", "mesh.fsdp=1")
    assert "data.batch_size=6" in msg and "4" in msg


def test_mesh_product_must_equal_device_count():
    cfg = load_config(None, ["mesh.data=2", "mesh.fsdp=2", "data.batch_size=8"])
    with pytest.raises(ConfigError, match="multiply to 4 but there are 8 devices"):
        resolve_mesh(cfg, 8)
    assert resolve_mesh(load_config(None, ["mesh.data=-1", "mesh.tensor=2"]), 8) == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2}


def test_batch_checked_against_filled_mesh_axis():
    cfg = load_config(None, ["mesh.data=-1", "data.batch_size=4"])
    with pytest.raises(ConfigError, match="data.batch_size=4"):
        resolve_mesh(cfg, 8)


def test_unknown_preset_lists_the_known_ones():
    msg = error_of("model=llama9")
    assert "llama9" in msg and "llama3-8b" in msg


def test_cli_config_error_is_one_line_exit_2_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "infra.cli", "train", "model.n_heads=4", "model.n_kv_heads=3", f"run.dir={tmp_path}/r"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "model.n_kv_heads=3" in proc.stderr
    assert not (tmp_path / "r").exists()  # rejected before anything ran


def test_config_yaml_is_written_resolved(tmp_path):
    from train.run_dir import write_config

    cfg = tiny_config(tmp_path=tmp_path)
    write_config(cfg)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["d_model"] == 32 and saved["data"]["seq_len"] == 32


# ------------------------------------------------------------ tessera config


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and key != "rules":
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_config_show_prints_what_a_run_writes(tmp_path, capsys):
    from infra.cli import main
    from train.run_dir import write_config

    overrides = ["model=llama3-1b", "data.seq_len=128", "precision.compute=float32", f"run.dir={tmp_path}"]
    assert main(["config", "show", *overrides]) == 0
    shown = capsys.readouterr().out
    cfg = load_config(None, overrides)
    write_config(cfg)
    assert shown == (tmp_path / "config.yaml").read_text()
    again = load_config(tmp_path)
    assert again == cfg and again.precision.preset == "bf16"  # the preset's policy, one dtype set apart
    assert again.precision.policy.compute == "float32" and again.precision.policy.params == "float32"


def test_config_keys_name_every_key_with_a_description(capsys):
    from infra.cli import main
    from train.config_keys import config_keys

    keys = {k.path: k for k in config_keys()}
    dumped = load_config(None, ["model=deepseek-v2-lite", "data.seq_len=64", "model.qat.dtype=int8",
                                "distill.teacher=runs/t"]).model_dump(mode="json")
    assert set(_leaves(dumped)) <= set(keys)
    assert all(k.description for k in keys.values()), [p for p, k in keys.items() if not k.description]
    assert keys["model.n_layers"].type == "int (>= 1)" and keys["model.n_layers"].default == "4"
    assert keys["precision.preset"].type == "fp32 | bf16 | bf16-pure"
    assert keys["distill.teacher"].default == "(required)"
    assert main(["config", "keys", "--json"]) == 0
    assert {k["path"] for k in json.loads(capsys.readouterr().out)} == set(keys)


def test_config_schema_validates_recipes(tmp_path, capsys):
    import jsonschema

    from infra.cli import main

    from train.recipes import CONFIGS_DIR

    assert main(["config", "schema", "--out", str(tmp_path / "schema.json")]) == 0
    schema = json.loads((tmp_path / "schema.json").read_text())
    files = sorted(CONFIGS_DIR.glob("*/*.yaml"))
    assert len(files) >= 10
    for path in files:  # every shipped recipe and model preset, as written
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    jsonschema.validate(tiny_config().model_dump(mode="json"), schema)  # a run's config.yaml
    jsonschema.validate({"model": {"preset": "tiny", "n_layers": 2}, "train": {"steps": 7}}, schema)
    for bad in ({"model": {"n_layer": 2}}, {"precision": {"preset": "fp16"}}, {"n_layers": "two"},
                {"model": "tiny", "trainer": {}}, {"n_layers": 2, "precision": "fp16"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
