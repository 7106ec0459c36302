"""Any torch module as a decomposition target.

``DecomposedModel`` wraps a user's ``nn.Module`` as it is. Layers are chosen by
glob patterns over module names (``"blocks.*.mlp.fc_in"``); the wrapped model
is never rewritten: forward hooks read each chosen layer's input and, when
asked, replace its output by a sum of rank-1 pieces (masked per sample) or add
piece terms scaled by a per-sample epsilon (for attributions). Biases and every
parameter that is not decomposed stay on.

A *matrix* is one decomposed weight parameter, named after the first chosen
module that holds it. Piece c of a matrix is ``outer(U[c], V[c])`` in the
parameter's own shape. Modules that share one parameter (tied embeddings,
TMS's W and W^T) are several *uses* of one matrix, each with its orientation:

- ``linear`` (nn.Linear, weight (out, in)): out = a @ P.T = sum_c (a . V[c]) U[c]
- ``conv1d`` (GPT-2 Conv1D, weight (in, out)): out = a @ P = sum_c (a . U[c]) V[c]
- ``embedding`` (weight (num, dim)): out = P[i] = sum_c U[c, i] V[c]

A *sample* is one row of the output's leading dimensions: an input for a
(batch, d_out) output, a (sequence, position) for (batch, seq, d_out). Every
chosen layer must see the same rows (true of per-position layers), so masks,
attributions and co-activation are per sample row.
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

SUPPORTED_LAYERS = "nn.Linear, nn.Embedding, GPT-2-style Conv1D"


class TargetError(ValueError):
    """A model, pattern or input that cannot be decomposed; one line for the user."""


@dataclass(frozen=True)
class Use:
    module: str  # the module whose output this use produces
    kind: str  # "linear" | "conv1d" | "embedding"
    inserted: bool = False  # an inserted identity, applied in front of ``module``

    @property
    def transposed(self) -> bool:
        """True when the stored parameter acts through its transpose."""
        return self.kind != "linear"


@dataclass(frozen=True)
class Matrix:
    name: str
    param: str  # name in named_parameters(), or "" for an inserted identity
    shape: tuple[int, int]  # the parameter's shape: pieces are outer(U[c], V[c]) of this shape
    uses: tuple[Use, ...]


@dataclass(frozen=True)
class Forward:
    """A forward pass: output rows (N, d_out), the batch size and captured
    hidden activations {module: (N, d)}."""

    output: Tensor
    batch: int
    hidden: dict[str, Tensor] = field(default_factory=dict)


def layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    # transformers' Conv1D (and look-alikes): weight (in, out), forward a @ W + b
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "conv1d"
    return None


def use_inner(kind: str, a: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """(N, C): each piece's scalar on each input row of one use."""
    if kind == "linear":
        return a @ V.T
    if kind == "conv1d":
        return a @ U.T
    return U.T[a]  # embedding: a holds indices


def use_out_side(kind: str, U: Tensor, V: Tensor) -> Tensor:
    return U if kind == "linear" else V


def apply_pieces(kind: str, a: Tensor, U: Tensor, V: Tensor, scale: Tensor | None) -> Tensor:
    """sum_c scale[n, c] * piece_c applied to row n (all pieces when scale is None).
    Never forms a (C, d_out, d_in) tensor."""
    inner = use_inner(kind, a, U, V)
    return (inner if scale is None else inner * scale) @ use_out_side(kind, U, V)


def one_piece_apply(kind: str, a: Tensor, U: Tensor, V: Tensor, index: Tensor) -> Tensor:
    """Row n's piece ``index[n]`` applied to row n (index < 0: nothing): no
    (N, C) product, so removing one piece per row costs O(d) per row."""
    i = index.clamp_min(0)
    if kind == "linear":
        inner, out_side = (a * V[i]).sum(-1), U[i]
    elif kind == "conv1d":
        inner, out_side = (a * U[i]).sum(-1), V[i]
    else:
        inner, out_side = U[i, a], V[i]
    return (inner * (index >= 0).to(inner.dtype))[:, None] * out_side


def dense_apply(kind: str, a: Tensor, W: Tensor) -> Tensor:
    if kind == "linear":
        return a @ W.T
    if kind == "conv1d":
        return a @ W
    return W[a]


def select_output(raw: Any, output: str | None) -> Tensor:
    """The tensor to attribute: ``raw`` itself, or its attribute / key /
    index named by ``output`` (e.g. "logits")."""
    if output is None:
        if isinstance(raw, Tensor):
            return raw
        if hasattr(raw, "logits"):
            return raw.logits
        raise TargetError(f"the model returns a {type(raw).__name__}, not a tensor: name the output to attribute "
                          "(--output, e.g. logits)")
    value = raw
    for part in output.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, (tuple, list)) and part.lstrip("-").isdigit():
            value = value[int(part)]
        elif hasattr(value, part):
            value = getattr(value, part)
        else:
            raise TargetError(f"the model's output ({type(raw).__name__}) has no {output!r}")
    if not isinstance(value, Tensor):
        raise TargetError(f"output {output!r} is a {type(value).__name__}, not a tensor")
    return value


def match_modules(model: nn.Module, patterns: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Modules whose names match any pattern, in the model's order. A pattern
    matching nothing is an error."""
    named = [(n, m) for n, m in model.named_modules() if n]
    out, seen = [], set()
    for pattern in patterns:
        hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            some = ", ".join(n for n, _ in named[:12]) + (", ..." if len(named) > 12 else "")
            raise TargetError(f"pattern {pattern!r} matches no module of {type(model).__name__} (modules: {some})")
        for n, m in hits:
            if n not in seen:
                seen.add(n)
                out.append((n, m))
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(out, key=lambda nm: order[nm[0]])


@dataclass
class _Pass:
    """What one forward pass does at the hooks."""

    replace: Mapping[str, tuple[Tensor, Tensor, Tensor | None]] = field(default_factory=dict)  # U, V, mask
    add: Mapping[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # U, V, eps
    remove: Mapping[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # U, V, piece index per row
    per_row: Mapping[str, Tensor] = field(default_factory=dict)  # (N, *shape) weight per row (reference)
    record: list | None = None  # [(matrix, use, a)] of every use, in call order
    hidden: dict | None = None


class DecomposedModel:
    """A module plus which of its layers are decomposed, which output is
    attributed, and which hidden activations the minimality loss also matches.
    ``fast_sites`` is an optional closed-form attribution path (built-in toys)."""

    def __init__(self, module: nn.Module, patterns: Sequence[str], output: str | None = None,
                 insert_identity: Sequence[str] = (), hidden: Sequence[str] = (),
                 fast_sites: Callable | None = None):
        self.module = module
        self.patterns = tuple(patterns)
        self.output = output
        self.fast_sites = fast_sites
        if not self.patterns:
            raise TargetError("no layers chosen: give at least one module pattern (--modules)")
        params = {id(p): n for n, p in module.named_parameters(remove_duplicate=True)}
        matrices: dict[int, Matrix] = {}
        for name, mod in match_modules(module, self.patterns):
            kind = layer_kind(mod)
            if kind is None:
                raise TargetError(f"module {name!r} ({type(mod).__name__}) is not a layer apd can decompose "
                                  f"(supported: {SUPPORTED_LAYERS})")
            if isinstance(mod, nn.Embedding) and mod.max_norm is not None:
                raise TargetError(f"module {name!r}: nn.Embedding with max_norm is not supported")
            w = mod.weight
            key = id(w)
            if key in matrices:
                old = matrices[key]
                matrices[key] = Matrix(old.name, old.param, old.shape, old.uses + (Use(name, kind),))
            else:
                matrices[key] = Matrix(name, params[key], tuple(w.shape), (Use(name, kind),))
        self.matrices: dict[str, Matrix] = {m.name: m for m in matrices.values()}
        self._weights = {m.name: self._module_weight(m) for m in self.matrices.values()}
        # Inserted identities: a frozen d_in x d_in identity in front of each
        # matched layer, decomposed like any other matrix (a sanity check
        # whose answer is known: one mechanism that every input uses).
        self.identities: dict[str, str] = {}  # identity matrix name -> module it sits in front of
        for name, mod in (match_modules(module, insert_identity) if insert_identity else []):
            kind = layer_kind(mod)
            if kind not in ("linear", "conv1d"):
                raise TargetError(f"--insert-identity: module {name!r} ({type(mod).__name__}) is not a "
                                  "nn.Linear or Conv1D")
            d_in = mod.weight.shape[1] if kind == "linear" else mod.weight.shape[0]
            ident = f"{name}.identity"
            w = next(module.parameters())
            self._weights[ident] = torch.eye(d_in, dtype=w.dtype, device=w.device)
            self.matrices[ident] = Matrix(ident, "", (d_in, d_in), (Use(name, "linear", inserted=True),))
            self.identities[ident] = name
        self.hidden_modules = [n for n, _ in match_modules(module, hidden)] if hidden else []
        self._pass: _Pass | None = None
        self._handles: list = []

    # -- description --------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.matrices)

    def weights(self) -> dict[str, Tensor]:
        """{matrix: its weight, detached, in the parameter's shape}."""
        return {n: w.detach() for n, w in self._weights.items()}

    def _module_weight(self, m: Matrix) -> Tensor:
        return dict(self.module.named_parameters())[m.param]

    def to(self, device: torch.device) -> "DecomposedModel":
        self.module.to(device)
        self._weights = {n: (self._module_weight(m) if m.param else self._weights[n].to(device))
                         for n, m in self.matrices.items()}
        return self

    # -- hooks: installed for one pass, removed after it (the user's module
    # keeps no trace of apd between passes) -----------------------------------
    def _install_hooks(self) -> None:
        mods = dict(self.module.named_modules())
        for m in self.matrices.values():
            for use in m.uses:
                if use.inserted:
                    self._handles.append(mods[use.module].register_forward_pre_hook(self._identity_hook(m.name, use)))
                else:
                    self._handles.append(mods[use.module].register_forward_hook(self._use_hook(m.name, use)))
        for name in self.hidden_modules:
            self._handles.append(mods[name].register_forward_hook(self._hidden_hook(name)))

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pieces_out(self, name: str, use: Use, a_rows: Tensor, dense_rows: Callable[[], Tensor]) -> Tensor:
        """The output rows of one use under the current pass."""
        p = self._pass
        if name in p.per_row:
            W = p.per_row[name]
            if use.kind == "linear":
                return torch.einsum("ni,noi->no", a_rows, W)
            if use.kind == "conv1d":
                return torch.einsum("ni,nio->no", a_rows, W)
            return W[torch.arange(len(a_rows), device=W.device), a_rows]
        if name in p.replace:
            U, V, mask = p.replace[name]
            return apply_pieces(use.kind, a_rows, U, V, mask)
        out = dense_rows()
        if name in p.add:
            U, V, eps = p.add[name]
            out = out + apply_pieces(use.kind, a_rows, U, V, eps)
        if name in p.remove:
            U, V, index = p.remove[name]
            out = out - one_piece_apply(use.kind, a_rows, U, V, index)
        return out

    def _rows(self, use: Use, a: Tensor) -> Tensor:
        return a.reshape(-1) if use.kind == "embedding" else a.reshape(-1, a.shape[-1])

    def _use_hook(self, name: str, use: Use):
        def hook(mod: nn.Module, args, output):
            p = self._pass
            a = args[0]
            rows = self._rows(use, a)
            if p.record is not None:
                p.record.append((name, use, rows))
            if not (name in p.replace or name in p.add or name in p.remove or name in p.per_row):
                return None
            bias = getattr(mod, "bias", None) if use.kind != "embedding" else None
            if name in p.add or name in p.remove:  # output already holds the bias
                new = self._pieces_out(name, use, rows, lambda: output.reshape(len(rows), -1))
            else:
                new = self._pieces_out(name, use, rows, lambda: None)
                if bias is not None:
                    new = new + bias
            return new.reshape(*output.shape[:-1], new.shape[-1])
        return hook

    def _identity_hook(self, name: str, use: Use):
        def hook(mod: nn.Module, args):
            p = self._pass
            a = args[0]
            rows = self._rows(use, a)
            if p.record is not None:
                p.record.append((name, use, rows))
            ident = self._weights[name]
            new = self._pieces_out(name, use, rows, lambda: rows @ ident.T)
            return (new.reshape(a.shape), *args[1:])
        return hook

    def _hidden_hook(self, name: str):
        def hook(mod, args, output):
            p = self._pass
            if p.hidden is not None:
                p.hidden[name] = output.reshape(-1, output.shape[-1])
        return hook

    @contextmanager
    def _passing(self, p: _Pass) -> Iterator[_Pass]:
        if self._pass is not None:
            raise RuntimeError("DecomposedModel passes do not nest")
        self._pass = p
        self._install_hooks()
        try:
            yield p
        finally:
            self._remove_hooks()
            self._pass = None

    # -- forward passes -----------------------------------------------------
    def _call(self, x: Tensor, p: _Pass) -> Forward:
        with self._passing(p):
            out = select_output(self.module(x), self.output)
        if out.dim() < 2:
            raise TargetError(f"the attributed output has shape {tuple(out.shape)}; need (batch, ..., d_out)")
        rows = out.reshape(-1, out.shape[-1])
        return Forward(rows, int(out.shape[0]), dict(p.hidden or {}))

    def forward(self, x: Tensor, hidden: bool = False) -> Forward:
        """The target itself (inserted identities are exact, so unchanged).
        Calling the module directly gives the same output."""
        return self._call(x, _Pass(hidden={} if hidden else None))

    def run(self, x: Tensor, pieces: Mapping[str, tuple[Tensor, Tensor]], masks: Mapping[str, Tensor | None],
            hidden: bool = False) -> Forward:
        """Every decomposed matrix replaced by the sum of its pieces that
        ``masks[name]`` (N, C) keeps per row (None: all pieces)."""
        return self._call(x, _Pass(replace={n: (U, V, masks.get(n)) for n, (U, V) in pieces.items()},
                                   hidden={} if hidden else None))

    def run_added(self, x: Tensor, pieces: Mapping[str, tuple[Tensor, Tensor]], eps: Mapping[str, Tensor]) -> Forward:
        """The target plus eps[name][n, c] * piece c on row n: d out / d eps
        is each piece's effect (attributions)."""
        return self._call(x, _Pass(add={n: (U, V, eps[n]) for n, (U, V) in pieces.items()}))

    def run_removed(self, x: Tensor, name: str, piece: tuple[Tensor, Tensor], index: Tensor) -> Forward:
        """The target with piece ``index[n]`` of matrix ``name`` removed on
        row n (index < 0: nothing removed): ablation attributions."""
        U, V = piece
        return self._call(x, _Pass(remove={name: (U, V, index)}))

    def run_per_row(self, x: Tensor, weights: Mapping[str, Tensor]) -> Forward:
        """Each matrix given per sample row, (N, *shape): the slow reference."""
        return self._call(x, _Pass(per_row=dict(weights)))

    def record(self, x: Tensor) -> tuple[Forward, list[tuple[str, Use, Tensor]]]:
        """The target forward and every use's input rows, in call order."""
        p = _Pass(record=[], hidden={})
        fwd = self._call(x, p)
        return fwd, p.record

    def input_activations(self, x: Tensor) -> dict[str, Tensor]:
        """Each matrix's input rows at its first non-transposed use (data init)."""
        with torch.no_grad():
            _, uses = self.record(x)
        acts: dict[str, Tensor] = {}
        for name, use, a in uses:
            if name not in acts and use.kind == "linear":
                acts[name] = a
        return acts

    def check_rows(self, x: Tensor) -> Forward:
        """Run once and check every use sees one row per output sample row."""
        with torch.no_grad():
            fwd, uses = self.record(x)
        n = fwd.output.shape[0]
        for name, use, a in uses:
            if a.shape[0] != n:
                raise TargetError(
                    f"layer {use.module!r} sees {a.shape[0]} rows of input but the output has {n} sample rows: "
                    "apd decomposes layers applied per sample or per position")
        seen = {name for name, _, _ in uses}
        unused = [n for n in self.matrices if n not in seen]
        if unused:
            raise TargetError(f"chosen layer(s) {', '.join(unused)} are not used in the model's forward pass")
        return fwd
