"""The training config's schema: every key typed, ranged and named in its errors; the
choices equal to the modules' own lists; files read with bounded aliases; 0.1.0 configs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cscvision.cli import main
from cscvision.core.config_files import MAX_YAML_NODES, read_json
from cscvision.core.errors import CscvisionError
from cscvision.training.config import (
    ConfigError,
    config_names,
    config_schema,
    config_to_dict,
    load_config,
    resolve_config,
)
from cscvision.training.config_sections import MODEL_SECTIONS, MILSection, TrainConfig


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.eval_batch_size=abc", "data.eval_batch_size 'abc': input should be a valid integer"),
        ("model.pretrained=3", "model.pretrained 3: input should be a valid string"),
        ("trainer.devices=banana", "trainer.devices 'banana': expected a count"),
        ("data.max_tiles_per_slide=-5", "data.max_tiles_per_slide -5: input should be greater"),
        ("trainer.precision=fp8", "trainer.precision 'fp8': input should be 'auto'"),
        ("cohort.split_fractions=[0.7, 0.2, 1.5]", "cohort.split_fractions.2 1.5"),
        ("card.colors={stemness: [1, 2]}", "card.colors.stemness"),
        ("optim.lr=true", "optim.lr True: expected a number, got true/false"),
        ("mil.epochs=0", "mil.epochs 0: input should be greater"),
        ("kind=tiles", "kind: model kind 'tiles' is not registered; known kinds: finetune"),
    ],
)
def test_train_refuses_a_bad_override_naming_the_key(override, named, capsys):
    """Each accepted by 0.1.0's coercer (it took types from the defaults); now exit 2."""
    assert main(["train", "--config", "cpu_demo", override, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "cpu_demo.yaml: " in err and named in err


def test_good_overrides_still_read():
    cfg = load_config("cpu_demo", ["trainer.devices=[0, 1]", "trainer.precision=16",
                                   "optim.lr=1e-4", "trainer.devices=auto"])  # fmt: skip
    assert cfg.trainer.precision == "16" and cfg.optim.lr == 1e-4
    assert load_config(None, ["trainer.devices=-1"]).trainer.devices == -1


@pytest.mark.parametrize("name", config_names())
def test_every_packaged_training_config_loads(name):
    if name in ("cell_types", "ihc_markers", "immune_phenotype", "st_panels"):
        pytest.skip("not a training config")
    cfg = load_config(name)
    assert type(cfg.model) is MODEL_SECTIONS[cfg.kind]


def test_a_0_1_0_config_loads(tmp_path):
    """0.1.0 wrote ``task:`` (mil: the model kind) and listed every model key for any kind."""
    old = tmp_path / "old.yaml"
    old.write_text(
        "task: mil\nmodel: {backbone: resnet18, encoder: demo-cnn, weights: w.safetensors, "
        "head: linear, finetune_blocks: 0, pretrained: null}\nmil: {labels: l.csv, epochs: 3}\n"
    )
    cfg = load_config(old)
    assert cfg.kind == "mil" and cfg.model.kind == "mil" and cfg.mil.epochs == 3
    assert load_config(None, ["task=regression"]).target_type == "regression"
    assert load_config(None, ["model.encoder=demo-cnn", "model.weights=w"]).kind == "head"


def test_the_model_section_is_one_variant_per_kind():
    with pytest.raises(ConfigError, match=r"model\.encoder: kind tile trains model\.backbone"):
        load_config(None, ["kind=tile", "model.encoder=demo-cnn", "model.weights=w"])
    with pytest.raises(ConfigError, match=r"model\.finetune_blocks: kind head keeps"):
        load_config(None, ["kind=head", "model.encoder=demo-cnn", "model.weights=w",
                           "model.finetune_blocks=2"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\.finetune_blocks: kind mil trains on stored"):
        load_config(None, ["kind=mil", "model.encoder=demo-cnn", "model.weights=w",
                           "model.finetune_blocks=1"])  # fmt: skip


def test_the_schema_names_the_same_choices_as_the_code():
    """The config does not import the modules it configures; these lists must agree."""
    from cscvision.models.backbones import BACKBONES
    from cscvision.models.calibration import METHODS
    from cscvision.models.heads import HEADS
    from cscvision.models.kinds import KINDS
    from cscvision.models.mil_net import ARCHITECTURES
    from cscvision.training import config_sections as s
    from cscvision.training.augment import AUGMENT_PRESETS
    from cscvision.training.data import BALANCE_MODES
    from cscvision.training.lit import SCHEDULERS
    from cscvision.training.regression import LOSSES, TARGET_TYPES

    assert set(s.BACKBONES) == set(BACKBONES) and set(s.AUGMENTS) == set(AUGMENT_PRESETS)
    assert s.BALANCE == BALANCE_MODES and s.SCHEDULERS == SCHEDULERS
    assert s.CALIBRATION == METHODS and s.LOSSES == LOSSES and s.TARGET_TYPES == TARGET_TYPES
    assert s.HEADS == HEADS and s.MIL_ARCHITECTURES == ARCHITECTURES
    assert set(MODEL_SECTIONS) == set(KINDS)


def test_reading_a_config_imports_no_torch_and_builds_no_encoder():
    code = (
        "import sys; from cscvision.training.config import load_config; "
        "[load_config(n) for n in ('default', 'cpu_demo', 'cpu_head_demo')]; "
        "load_config(None, ['model.encoder=test-vit-tiny', 'model.weights=w', "
        "'model.finetune_blocks=13']); "
        "print(sorted(m for m in ('torch', 'timm', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_mil_record_one_set_of_defaults():
    from cscvision.cli import build_parser
    from cscvision.training.mil import MILConfig

    shared = ("architecture", "hidden", "attention", "dropout", "max_bag", "accumulate", "epochs")
    assert {k: getattr(MILConfig(), k) for k in shared} == {
        k: getattr(MILSection(), k) for k in shared
    }
    mil = build_parser()._subparsers._group_actions[0].choices["mil"]
    defaults = {a.dest: a.default for a in mil._actions}
    for key in ("epochs", "max_bag", "accumulate", "architecture"):
        assert defaults[key] == getattr(MILConfig(), key), key


def test_a_yaml_alias_bomb_is_refused_in_one_line(tmp_path):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")  # 9**9 (387 million) strings once expanded
    with pytest.raises(ConfigError, match=rf"bomb\.yaml: .*more than {MAX_YAML_NODES:,}"):
        load_config(bomb)
    recursive = tmp_path / "loop.yaml"
    recursive.write_text("a: &a [*a]\n")
    with pytest.raises(ConfigError, match=r"loop\.yaml: not valid YAML"):
        load_config(recursive)


@pytest.mark.parametrize(
    ("text", "message"),
    [("data: [1, 2\n", r"broken\.yaml: not valid YAML"), ("- 1\n- 2\n", "expected a mapping")],
)
def test_parse_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    with pytest.raises(CscvisionError, match=r"bad\.json: not valid JSON"):
        read_json(bad_json)


def test_config_schema_command_writes_a_schema_every_config_fits(tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "schema.json"
    assert main(["config", "schema", "--out", str(out)]) == 0
    schema = json.loads(out.read_text())
    assert schema == json.loads(json.dumps(config_schema()))
    for name in ("default", "cpu_demo", "cpu_head_demo", "gpu", "multi_gpu"):
        jsonschema.validate(config_to_dict(load_config(name)), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"data": {"batch_size": 0}}, schema)


def test_config_show_resolved_prints_the_values(capsys):
    assert main(["config", "show", "cpu_demo", "trainer.max_epochs=2", "--resolved"]) == 0
    out = capsys.readouterr().out
    assert "max_epochs: 2" in out and "kind: tile" in out and "#" not in out
    assert main(["config", "show", "--resolved", "cpu_demo", "trainer.max_epochs=x"]) == 2
    assert "trainer.max_epochs 'x'" in capsys.readouterr().err


def test_default_config_is_the_schema_default():
    assert load_config("default") == TrainConfig()
    assert resolve_config("default").name == "default.yaml"


@pytest.mark.parametrize("name", ["default", "cpu_head_demo"])
def test_a_resolved_config_reads_back_as_itself(name, tmp_path):
    """The run folder's config.yaml (train --print-config) is a config train takes again."""
    import yaml

    cfg = load_config(name)
    written = tmp_path / "config.yaml"
    written.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    assert load_config(written) == cfg


def test_the_model_card_parts_are_typed_per_kind():
    """Issue 23's gap: the card's encoder and mil parts were loose dicts."""
    from cscvision.models.card import ModelCard, ModelError
    from cscvision.models.kinds import get_kind

    ref = {"name": "demo-cnn", "weights_sha256": "ab" * 32, "dim": 64, "features_dir": "f"}
    card = ModelCard(name="h", backbone="linear", kind="head", encoder=ref)
    assert card.encoder == ref  # extra keys of a kind stay
    with pytest.raises(ModelError, match=r"h: a model of kind head needs its encoder record"):
        get_kind("head").check_card(ModelCard(name="h", backbone="linear", kind="head"))
    with pytest.raises(ValueError, match=r"encoder\.weights_sha256\s+Field required"):
        ModelCard(name="h", backbone="linear", kind="head", encoder={"name": "demo-cnn"})
    with pytest.raises(ValueError, match=r"encoder\.dim\s+Input should be greater"):
        ModelCard(name="h", backbone="linear", kind="head", encoder={**ref, "dim": 0})
    mil = {"architecture": "gated_attention", "in_dim": 64, "hidden": 8, "attention": 4}
    assert ModelCard(name="m", backbone="gated_attention", kind="mil", encoder=ref, mil=mil).mil
    no_mil = ModelCard(name="m", backbone="gated_attention", kind="mil", encoder=ref)
    with pytest.raises(ModelError, match=r"m: a model of kind mil needs its mil record"):
        get_kind("mil").check_card(no_mil)  # load_model runs it
    with pytest.raises(ValueError, match=r"mil\.architecture"):
        ModelCard(name="m", backbone="x", kind="mil", encoder=ref,
                  mil={**mil, "architecture": "transmil"})  # fmt: skip
    assert ModelCard(name="t", backbone="small_cnn").encoder == {}  # a tile CNN has none
