"""Validated, frozen configs, one per stage: a leaf (imports nothing of
apdkit). Generic defaults live here and only here; a built-in target brings
its own stage-1 defaults (targets/registry.py). A run's config is resolved as
generic < per-target < YAML file < command-line flags."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PerMatrix = float | dict[str, float]
Attribution = Literal["gradient", "integrated_gradients", "ablation"]  # core/attributions.py


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line for the user."""


class Stage1Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    n_pieces: int | dict[str, int] = Field(64, description="rank-1 pieces per matrix (C), one value or per matrix name")
    topk: PerMatrix = Field(1.0, description="batch top-k: mean active pieces per input, per matrix "
                            "(minimality topk only)")
    whole: list[str] = Field(
        default_factory=list, description="name patterns (fnmatch) of matrices kept whole: min(d_out, d_in) pieces, "
        "every one kept on every input it acts on (top-k) or with its gate fixed at 1 (learned); n_pieces and topk do "
        "not apply to them")
    minimality: Literal["topk", "learned"] = Field(
        "topk", description="which pieces must reproduce the output: topk (APD: the batch top-k by attribution) or "
        "learned (a gate per piece, trained with stochastic masks and an importance penalty; no k)")
    importance_coeff: float = Field(1.0, ge=0, description="learned: weight of the gates' penalty: the important "
                                    "pieces per matrix and input, over the matrix's rank, against the output error as a "
                                    "fraction of the ablated one (with minimality_target: its starting value)")
    minimality_target: float | None = Field(
        None, gt=0, lt=1, description="learned: when set, importance_coeff is only the starting weight of the gates' "
        "penalty; it then adapts every step so the masked output error, as a fraction of the ablated one, settles "
        "at this value (an error level instead of a coefficient; the toys do better with a fixed coefficient)")
    importance_p: float = Field(1.0, gt=0, le=2, description="learned: the penalty is the sum of relu(z)^p, z a gate's "
                                "pre-activation")
    learned_faithfulness_coeff: float = Field(100.0, gt=0, description="learned: weight of |W - sum of pieces|^2 / "
                                              "|W|^2 (the per-target coefficients are for top-k mode)")
    gate_hidden: int = Field(16, gt=0, description="learned: hidden units of each piece's gate network")
    gate_threshold: float = Field(0.1, gt=0, lt=1, description="learned: a piece is active where its gate exceeds this")
    steps: int = Field(5000, gt=0, description="training steps after the warm start")
    warm_start_steps: int = Field(200, ge=0, description="faithfulness-only steps before the full objective")
    init: Literal["random", "data"] = Field(
        "data", description="data: V from diverse input activations on sampled data (k-means++); random: random unit V")
    batch_size: int = Field(1024, gt=0)
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup: float = Field(0.01, ge=0, lt=1, description="fraction of steps with linear lr warm-up")
    faithfulness_coeff: float = Field(1.0, ge=0)
    minimality_coeff: float = Field(1.0, ge=0)
    simplicity_coeff: float = Field(1.0, ge=0)
    hidden_coeff: float = Field(0.0, ge=0, description="hidden-activation reconstruction (resid_mlp)")
    stochastic_coeff: float = Field(0.0, ge=0, description="output reconstruction with the inactive pieces at random "
                                    "values in [0, 1] (what verify's stochastic and adversarial checks try)")
    set_aside_coeff: float = Field(0.0, ge=0, description="output reconstruction with every piece the batch selects "
                                   "on and the others off (what verify's set-aside condition tries)")
    schatten_p: float = Field(0.9, gt=0, le=2)
    simplicity_final: float = Field(
        0.0, ge=0, le=1,
        description="simplicity weight at the last step, relative to its start value",
    )
    simplicity_anneal_from: float = Field(
        0.5, ge=0, le=1,
        description="fraction of the main phase after which the simplicity weight moves linearly to simplicity_final",
    )
    eval_samples: int = Field(10_000, gt=0, description="samples scored and masked for stage 2")
    eval_chunk: int = Field(2048, gt=0, description="zarr chunk length along samples")
    log_every: int = Field(100, gt=0, description="steps between metric reads (the only host syncs)")
    checkpoint_every: int = Field(500, gt=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = Field(False, description="torch.compile the loss and its gradient (on a GPU: CUDA graphs, "
                          "mode reduce-overhead); same pieces as without, within float tolerance")
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="bfloat16: autocast the forward passes and attributions (faithfulness stays float32)")
    max_exact_outputs: int = Field(512, gt=0, description="exact attributions up to this many outputs per input "
                                   "(sequence positions x output size); above it, a random-probe estimate")
    attribution_probes: int = Field(64, gt=0, description="random probes of the attribution estimate")
    attribution: Attribution = Field(
        "gradient", description="how pieces are attributed: gradient at the target; integrated_gradients along the "
        "path from every piece off to the target; ablation: the output change when a piece is removed")
    integration_steps: int = Field(8, gt=0, description="integrated_gradients: points on the path")

    @field_validator("n_pieces")
    @classmethod
    def _positive_pieces(cls, v):
        values = v.values() if isinstance(v, dict) else [v]
        if any(int(c) < 1 for c in values):
            raise ValueError("must be >= 1")
        return v

    @field_validator("topk")
    @classmethod
    def _positive_topk(cls, v):
        values = v.values() if isinstance(v, dict) else [v]
        if any(float(k) <= 0 for k in values):
            raise ValueError("must be > 0")
        return v

    @model_validator(mode="after")
    def _checkpoint_on_log_steps(self):
        if self.checkpoint_every % self.log_every:
            raise ValueError(f"checkpoint_every ({self.checkpoint_every}) must be a multiple of log_every ({self.log_every})")
        return self

    def per_matrix(self, field: str, names: list[str], fixed: dict[str, float] | None = None) -> dict[str, float]:
        """{matrix: value} of ``n_pieces`` or ``topk``. ``fixed`` gives values
        that override the setting (matrices kept whole, inserted identities:
        as many pieces as the rank allows, all active)."""
        value = getattr(self, field)
        fixed = fixed or {}
        if isinstance(value, dict):
            unknown = set(value) - set(names)
            missing = set(names) - set(value) - set(fixed)
            if unknown or missing:
                raise ConfigError(f"config {field} must name the decomposed matrices {names}; "
                                  f"unknown {sorted(unknown)}, missing {sorted(missing)}")
            return {n: fixed.get(n, value.get(n)) for n in names}
        return {n: fixed.get(n, value) for n in names}

    def whole_matrices(self, names: list[str]) -> list[str]:
        """The matrices of ``names`` that ``whole`` names, in order."""
        unmatched = [p for p in self.whole if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ConfigError(f"config whole: {unmatched} match no decomposed matrix of {names}")
        return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.whole)]


GROUPING_METHODS = ("spectral", "louvain", "leiden", "mdl", "threshold", "auto")


TOGETHER_MIN = 0.3  # GroupConfig.together_min where a row is one input


class GroupConfig(BaseModel):
    """Stage 2: grouping rank-1 pieces into mechanisms."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["spectral", "louvain", "leiden", "mdl", "threshold", "auto"] = "spectral"
    name: str | None = Field(None, description="name of this grouping in the store (default: the method)")
    n_groups: int | None = Field(None, gt=0, description="spectral: fixed number of groups (default: automatic)")
    alpha: float = Field(4.0, gt=0, description="description length: bits per input per unit of rank")
    threshold: float = Field(0.5, gt=0, le=1, description="threshold: Jaccard co-activation for an edge")
    resolution: float = Field(1.0, gt=0, description="louvain/leiden resolution")
    together_min: float | None = Field(
        None, ge=0, lt=1, description="any method: no mechanism keeps two pieces that fire together on at most this "
        "share of the rarer one's inputs, or at most twice as often as chance (such groups are split), and no "
        "mechanism is a union of two (see the README; 0: both off; not applied with --n-groups). Default: 0.3 "
        "when a row is one input; off when rows are a sequence's positions, "
        "where one mechanism's pieces act at different positions (an attention head's query and key)")
    shared_pieces: Literal["method", "own"] = Field(
        "own", description="where the apart rule is on, a piece that fires about as often with each of two "
        "mechanisms that never share inputs (a readout two features share, a W_in piece that mixes two features): "
        "'own' makes it a mechanism of its own, so no mechanism holds pieces of two such mechanisms; 'method' "
        "leaves it on the side the method chose (resid_mlp3, 5 seeds: spectral merges 0 features with 'own', 2 "
        "on one seed with 'method'; 'own' splits 4-17 features; benchmarks/RESULTS.md, 'Unions')")
    always_on: Literal["method", "own"] = Field(
        "own", description="a mechanism that spans several modules (a matrix's module is its name's parent: "
        "'layers.1' for 'layers.1.q'): 'own' makes each module's part that is on for at least 99% of the inputs "
        "a mechanism of its own, since such a part fires with any other at chance and co-activation cannot tie "
        "them; 'method' leaves it where the method put it (induction-sink, mdl: layer 1's always-on Q, K and V "
        "joined layer 0's head; benchmarks/RESULTS.md, 'Always-on parts')")
    min_rate: float = Field(1e-3, ge=0, lt=1, description="pieces active on fewer inputs than this fraction are dead")
    rank_rtol: float = Field(0.05, gt=0, lt=1, description="numerical rank: singular values below this times the largest piece are zero")
    dl_samples: int = Field(50_000, gt=0, description="inputs sampled for description lengths inside methods "
                            "and for the union split")
    samples: int | None = Field(None, gt=0, description="inputs to collect co-activation on (default: stage 1's evaluation set)")
    chunk: int = Field(4096, gt=0, description="inputs per chunk when collecting new samples")
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v):
        if v is not None and (not v or "/" in v or v.startswith((".", "_"))):
            raise ValueError("must be a plain name (no '/', not starting with '.' or '_')")
        return v

    @property
    def grouping_name(self) -> str:
        return self.name or self.method


class VerifyConfig(BaseModel):
    """Stage 3: independent checks of a grouping, with pass thresholds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    grouping: str | None = Field(None, description="grouping to verify (default: the only one in the store)")
    samples: int | None = Field(None, gt=0, description="fresh inputs drawn for the minimality check "
                                "(default: as many as stage 1's evaluation set)")
    faithfulness_max: float = Field(0.02, gt=0, description="largest relative error |W - sum of mechanisms| / |W| per matrix")
    set_aside_error_max: float = Field(
        0.1, gt=0, description="largest output MSE with every mechanism on and the pieces set aside as dead off, as a "
        "fraction of the MSE with every decomposed matrix ablated: weight that no input uses must not matter")
    output_error_max: float = Field(0.25, gt=0, description="largest output MSE with only the active mechanisms, as a "
                                    "fraction of the MSE with every decomposed matrix ablated (0.25: the mechanisms "
                                    "reproduce at least 75% of what the decomposed matrices do to the output)")
    versus_pieces_max: float = Field(1.1, gt=0, description="largest ratio of that fraction to the stage-1 pieces' own: "
                                     "grouping must not lose what the pieces reproduce")
    attribution: Attribution | None = Field(
        None, description="how mechanisms are attributed (default: as stage 1 attributed pieces)")
    identity_active_min: float = Field(0.99, gt=0, le=1, description="an inserted identity's mechanism must be "
                                       "active on at least this share of fresh inputs")
    stochastic_samples: int = Field(1, ge=0, description="stochastic and resample checks: random mask draws per "
                                    "input (0: skip both checks)")
    adversarial_steps: int = Field(20, ge=0, description="adversarial check: projected gradient steps over the inactive "
                                   "mechanisms' masks (0: skip the check)")
    adversarial_step_size: float = Field(0.1, gt=0, le=1, description="adversarial check: change of a mask value per step")
    adversarial_rows: int = Field(2048, gt=0, description="adversarial check: sample rows searched, in whole inputs "
                                  "(the first ones of the minimality check's; for sequences, rows are positions)")
    adversarial_error_max: float = Field(0.5, gt=0, description="largest output MSE at the worst masks found, as a "
                                         "fraction of the MSE with every decomposed matrix ablated")
    seed: int = 0


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        parts.append(f"{loc}: {e['msg']}" + (f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""))
    return "invalid config: " + "; ".join(parts)


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return data


def _resolve(model: type[BaseModel], defaults: dict[str, Any], yaml_path: Path | None, flags: dict[str, Any]):
    """defaults < YAML < flags (None = not given), validated into ``model``."""
    values: dict[str, Any] = dict(defaults)
    if yaml_path is not None:
        values.update(load_yaml(yaml_path))
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return model(**values)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def resolve_stage1(target_defaults: dict[str, Any] | None = None, yaml_path: Path | None = None,
                   **flags: Any) -> Stage1Config:
    """Generic defaults < the target's defaults < YAML < flags (None = not given)."""
    return _resolve(Stage1Config, target_defaults or {}, yaml_path, flags)


def resolve_group(yaml_path: Path | None = None, target_defaults: dict[str, Any] | None = None,
                  **flags: Any) -> GroupConfig:
    """Generic defaults < the target's defaults < YAML < flags (None = not given)."""
    return _resolve(GroupConfig, target_defaults or {}, yaml_path, flags)


def resolve_verify(yaml_path: Path | None = None, **flags: Any) -> VerifyConfig:
    return _resolve(VerifyConfig, {}, yaml_path, flags)


def to_yaml(cfg: BaseModel, comments: bool = False) -> str:
    """The config as YAML that ``--config`` reads back unchanged; with
    ``comments``, each field's description above it."""
    values = cfg.model_dump()
    if not comments:
        return yaml.safe_dump(values, sort_keys=False)
    lines = [f"# {type(cfg).__name__}: every field, with its default; --config takes any subset"]
    for name, field in type(cfg).model_fields.items():
        if field.description:
            lines.append(f"# {field.description}")
        lines.append(yaml.safe_dump({name: values[name]}, sort_keys=False).rstrip())
    return "\n".join(lines) + "\n"
