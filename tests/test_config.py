import pytest

from apdkit.stages.config import ConfigError, GroupConfig, Stage1Config, resolve_group, resolve_stage1
from apdkit.targets.registry import TARGETS

TMS = TARGETS["tms_5-2"].stage1


def test_resolution_order_generic_target_yaml_flags(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("steps: 123\nlr: 0.5\n")
    cfg = resolve_stage1(TMS, yaml_file, lr=0.25, seed=None)
    assert cfg.steps == 123  # YAML over the per-target default
    assert cfg.lr == 0.25  # flag over YAML
    assert cfg.topk == TMS["topk"]  # per-target over generic
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
        resolve_stage1(TMS, yaml_file)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_config_is_frozen():
    cfg = Stage1Config()
    with pytest.raises(Exception):
        cfg.steps = 3


def test_per_matrix_values_must_name_the_decomposed_matrices():
    cfg = Stage1Config(topk={"W": 1.0, "typo": 2.0})
    with pytest.raises(ConfigError, match="unknown \\['typo'\\]"):
        cfg.per_matrix("topk", ["W"])
    assert Stage1Config(topk=0.5).per_matrix("topk", ["a", "b.identity"], {"b.identity": 4.0}) == \
        {"a": 0.5, "b.identity": 4.0}


def test_whole_names_matrices_by_pattern_and_overrides_their_pieces_and_k():
    cfg = Stage1Config(n_pieces={"layers.0.W_in": 130, "layers.0.W_out": 7}, topk=0.5, whole=["layers.*.W_out"])
    names = ["layers.0.W_in", "layers.0.W_out", "layers.1.W_in", "layers.1.W_out"]
    assert cfg.whole_matrices(names) == ["layers.0.W_out", "layers.1.W_out"]
    fixed = {"layers.0.W_out": 25.0, "layers.1.W_out": 25.0}
    assert cfg.per_matrix("topk", names, fixed) == {"layers.0.W_in": 0.5, "layers.0.W_out": 25.0,
                                                     "layers.1.W_in": 0.5, "layers.1.W_out": 25.0}
    with pytest.raises(ConfigError, match="missing \\['layers.1.W_in'\\]"):
        cfg.per_matrix("n_pieces", names, fixed)  # a matrix neither named nor whole
    with pytest.raises(ConfigError, match="whole: \\['W_typo'\\] match no decomposed matrix"):
        Stage1Config(whole=["W_typo"]).whole_matrices(names)


def test_every_target_has_valid_defaults():
    from apdkit.targets.load import TargetRef, decomposed_model

    for name, spec in TARGETS.items():
        cfg = resolve_stage1(spec.stage1)
        names = decomposed_model(TargetRef(name, modules=spec.modules), spec.make()).names
        assert set(cfg.per_matrix("topk", names)) == set(names)


def test_group_yaml_method_is_not_overridden_by_an_absent_flag(tmp_path):
    """The CLI passes None for flags not given, so YAML's method holds."""
    yaml_file = tmp_path / "g.yaml"
    yaml_file.write_text("method: mdl\n")
    assert resolve_group(yaml_file, method=None).method == "mdl"
    assert resolve_group(None, method=None).method == GroupConfig().method
