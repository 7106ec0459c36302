"""Turn what a user names into a target: a built-in toy, a factory given by
import path (``mypkg.models:build``), a Hugging Face causal LM (``hf:NAME``),
or a module object; and their data. Every failure is one line (TargetError).

A stored target reference (``TargetRef.as_dict()``) says how to rebuild the
module: the factory's import path and arguments; weights live in the store.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from apdkit.core.model import DecomposedModel, TargetError
from apdkit.targets.registry import TARGETS, get_target
from apdkit.targets.spec import TargetSpec

Sampler = Callable[[int, torch.Generator], Tensor]


@dataclass(frozen=True)
class TargetRef:
    """JSON-able: which model, which layers, which output, which data."""

    model: str  # built-in name | module:factory | hf:NAME_OR_PATH | object:module.Class
    kwargs: dict[str, Any] = field(default_factory=dict)
    modules: tuple[str, ...] = ()
    output: str | None = None
    hidden: tuple[str, ...] = ()
    insert_identity: tuple[str, ...] = ()
    data: str | None = None  # module:attr | file.pt | file.npy | None (built-in) | "object"

    @property
    def builtin(self) -> TargetSpec | None:
        return TARGETS.get(self.model)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "kwargs": dict(self.kwargs), "modules": list(self.modules),
                "output": self.output, "hidden": list(self.hidden), "insert_identity": list(self.insert_identity),
                "data": self.data}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TargetRef":
        return cls(d["model"], dict(d.get("kwargs") or {}), tuple(d.get("modules") or ()), d.get("output"),
                   tuple(d.get("hidden") or ()), tuple(d.get("insert_identity") or ()), d.get("data"))


SPEC_KEYS = {"model", "kwargs", "data", "modules", "output", "hidden", "insert_identity"}


def read_target_yaml(path: Path) -> dict[str, Any]:
    """A YAML target spec: model, kwargs, data, modules, output, hidden, insert_identity."""
    import yaml

    try:
        spec = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise TargetError(f"target spec {path} does not exist") from None
    except yaml.YAMLError as e:
        raise TargetError(f"target spec {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict) or "model" not in spec:
        raise TargetError(f"target spec {path} must be a mapping with at least 'model'")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise TargetError(f"target spec {path}: unknown key(s) {sorted(unknown)} (known: {sorted(SPEC_KEYS)})")
    return spec


def resolve_ref(model: str, modules=(), output=None, hidden=(), insert_identity=(), data=None,
                kwargs=None) -> TargetRef:
    """A reference from CLI-style strings (or a YAML target spec, which flags
    given beside it override); built-ins bring their own layers."""
    if model.endswith((".yaml", ".yml")):
        spec_file = read_target_yaml(Path(model))
        as_list = lambda v: [v] if isinstance(v, str) else list(v or [])  # noqa: E731
        return resolve_ref(str(spec_file["model"]), tuple(modules) or as_list(spec_file.get("modules")),
                           output or spec_file.get("output"), tuple(hidden) or as_list(spec_file.get("hidden")),
                           tuple(insert_identity) or as_list(spec_file.get("insert_identity")),
                           data or spec_file.get("data"), kwargs or spec_file.get("kwargs"))
    spec = TARGETS.get(model)
    if spec is None and ":" not in model:
        get_target(model)  # raises: unknown name
    if spec is not None:
        if data is not None:
            raise TargetError(f"{model} is a built-in target with its own data; --data is for your own model")
        return TargetRef(model, {}, tuple(modules) or spec.modules, output or spec.output,
                         tuple(hidden) or spec.hidden, tuple(insert_identity), None)
    if not modules:
        raise TargetError(f"{model}: name the layers to decompose with --modules PATTERN (e.g. 'blocks.*.mlp.*')")
    if data is not None and str(data).endswith((".pt", ".npy")):
        data = str(Path(data).resolve())  # the store must find it again from anywhere
    if model.startswith("hf:") and Path(model[3:]).exists():
        model = "hf:" + str(Path(model[3:]).resolve())
    return TargetRef(model, dict(kwargs or {}), tuple(modules), output, tuple(hidden), tuple(insert_identity), data)


def import_object(path: str) -> Any:
    """``package.module:attr.sub`` -> the object. The current directory is
    importable, as for ``python -m``."""
    if ":" not in path:
        raise TargetError(f"{path!r} is not an import path of the form package.module:name")
    mod_name, _, attr = path.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        obj = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, or the module's own error on import
        raise TargetError(f"cannot import {mod_name!r} (from {path!r}): {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TargetError(f"{mod_name!r} has no {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


def build_module(ref: TargetRef) -> nn.Module:
    """A fresh module (weights as the factory makes them)."""
    if ref.builtin is not None:
        return ref.builtin.make()
    if ref.model.startswith("hf:"):
        return load_hf(ref.model[3:], ref.kwargs)
    if ref.model.startswith("object:"):
        raise TargetError(f"this run's model was given as a Python object ({ref.model[7:]}); rebuild it yourself "
                          "and pass it: open_run(path).target(module=model)")
    factory = import_object(ref.model)
    if not callable(factory):
        raise TargetError(f"{ref.model} is a {type(factory).__name__}, not a callable that builds the model")
    try:
        module = factory(**ref.kwargs)
    except Exception as e:
        raise TargetError(f"{ref.model}() failed: {type(e).__name__}: {e}") from None
    if not isinstance(module, nn.Module):
        raise TargetError(f"{ref.model}() returned a {type(module).__name__}, not a torch nn.Module")
    return module


def load_hf(name: str, kwargs: dict) -> nn.Module:
    """A transformers causal LM from a local path or the local cache (never
    downloaded here)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise TargetError("hf: models need transformers: pip install 'apdkit[hf]'") from None
    try:
        return AutoModelForCausalLM.from_pretrained(name, local_files_only=True, **kwargs)
    except Exception as e:
        raise TargetError(f"cannot load hf:{name} from a local path or cache: {str(e).splitlines()[0]}") from None


def check_weights(module: nn.Module) -> None:
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise TargetError(f"the model's {name} holds NaN or infinite values")


def decomposed_model(ref: TargetRef, module: nn.Module) -> DecomposedModel:
    spec = ref.builtin
    fast = spec.fast_sites if spec is not None and set(ref.modules) == set(spec.modules) \
        and not ref.insert_identity else None
    return DecomposedModel(module, ref.modules, ref.output, ref.insert_identity, ref.hidden, fast)


# -- data --------------------------------------------------------------------
def sampler_from(data: Any, what: str) -> Sampler:
    """A ``sample(n, generator)`` from a callable, a tensor / array of inputs,
    or an iterable of input batches (read once into memory)."""
    if isinstance(data, (Tensor, np.ndarray)) or (not callable(data) and isinstance(data, Iterable)):
        return _rows_sampler(_as_tensor(data, what), what)
    if callable(data):
        return data
    raise TargetError(f"{what} is a {type(data).__name__}: give a callable sample(n, generator), "
                      "a tensor of inputs, or an iterable of input batches")


def _as_tensor(data: Any, what: str) -> Tensor:
    if isinstance(data, Tensor):
        return data
    if isinstance(data, np.ndarray):
        return torch.from_numpy(data)
    batches = []
    for batch in data:
        if isinstance(batch, (tuple, list)):  # (inputs, labels) from a DataLoader: inputs only
            batch = batch[0]
        if isinstance(batch, dict) and "input_ids" in batch:
            batch = batch["input_ids"]
        batches.append(torch.as_tensor(batch))
    if not batches:
        raise TargetError(f"{what} yielded no batches")
    try:
        return torch.cat(batches)
    except RuntimeError as e:
        raise TargetError(f"{what}: batches of different shapes ({str(e).splitlines()[0]})") from None


def _rows_sampler(rows: Tensor, what: str) -> Sampler:
    if rows.dim() < 1 or rows.shape[0] == 0:
        raise TargetError(f"{what} holds no inputs (shape {tuple(rows.shape)})")
    if rows.is_floating_point():
        rows = rows.float()

    def sample(n: int, gen: torch.Generator) -> Tensor:
        return rows[torch.randint(rows.shape[0], (n,), generator=gen)]
    return sample


def load_data(ref: TargetRef, module: nn.Module) -> Sampler:
    if ref.builtin is not None:
        spec = ref.builtin
        return lambda n, gen: spec.sample(module, n, gen)
    if ref.data is None:
        raise TargetError(f"{ref.model}: give the inputs with --data (module:callable, a .pt or .npy file)")
    if ref.data == "object":
        raise TargetError("this run's data was given as a Python object: pass it again (data=...)")
    path = Path(ref.data)
    if path.suffix in (".pt", ".npy"):
        if not path.is_file():
            raise TargetError(f"data file {path} does not exist")
        try:
            loaded = torch.load(path, weights_only=True) if path.suffix == ".pt" else np.load(path, allow_pickle=False)
        except Exception as e:
            raise TargetError(f"data file {path} cannot be read: {str(e).splitlines()[0]}") from None
        return sampler_from(loaded, f"data file {path}")
    return sampler_from(import_object(ref.data), ref.data)


def check_data(model: DecomposedModel, sample: Sampler, n: int = 4) -> None:
    """Draw a few inputs and run the model on them: wrong shapes and types
    fail here, in one line, before anything is written."""
    try:
        x = sample(n, torch.Generator().manual_seed(0))
    except Exception as e:
        raise TargetError(f"drawing inputs failed: {type(e).__name__}: {e}") from None
    if not isinstance(x, Tensor):
        raise TargetError(f"the data gives a {type(x).__name__}, not a tensor of inputs")
    if x.shape[0] != n:
        raise TargetError(f"asked the data for {n} inputs, got a tensor of shape {tuple(x.shape)}")
    try:
        model.check_rows(x)
    except TargetError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TargetError(f"the model fails on the data (inputs of shape {tuple(x.shape)}, "
                          f"{str(x.dtype).replace('torch.', '')}): {msg}") from None
