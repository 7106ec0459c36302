import pytest

from pipeline.config import STAGE1_TARGET_DEFAULTS, ConfigError, Stage1Config, resolve_stage1
from targets.registry import TARGETS


def test_resolution_order_generic_target_yaml_flags(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("steps: 123\nlr: 0.5\n")
    cfg = resolve_stage1("tms_5-2", yaml_file, lr=0.25, seed=None)
    assert cfg.steps == 123  # YAML over the per-target default
    assert cfg.lr == 0.25  # flag over YAML
    assert cfg.topk == STAGE1_TARGET_DEFAULTS["tms_5-2"]["topk"]  # per-target over generic
    assert cfg.seed == Stage1Config().seed  # None flags are "not given"


@pytest.mark.parametrize("text, fragment", [
    ("steps: 0\n", "steps: Input should be greater than 0"),
    ("topk: -1\n", "topk"),
    ("lerning_rate: 1\n", "lerning_rate: Extra inputs are not permitted"),
    ("device: tpu\n", "device"),
    ("- 1\n", "must hold a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_config_is_one_line_error(tmp_path, text, fragment):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(text)
    with pytest.raises(ConfigError) as err:
        resolve_stage1("tms_5-2", yaml_file)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_config_is_frozen():
    cfg = Stage1Config()
    with pytest.raises(Exception):
        cfg.steps = 3


def test_per_matrix_values_must_name_the_decomposed_matrices():
    cfg = Stage1Config(topk={"W": 1.0, "typo": 2.0})
    with pytest.raises(ConfigError, match="unknown \\['typo'\\]"):
        cfg.check_matrices(["W"])


def test_every_target_has_valid_defaults():
    for name in TARGETS:
        cfg = resolve_stage1(name)
        cfg.check_matrices(list(TARGETS[name].make().decomposed))
