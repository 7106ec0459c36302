"""One run = one zarr v3 directory. This module is the only code that knows
its paths, chunking and formats; docs/store.md mirrors it array by array.

Writers (the stages) use ``RunStore``; readers (users, other tools, stage 2)
use ``open_run`` and the ``Run`` it returns.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import zarr

FORMAT_VERSION = 2
try:
    APD_VERSION = version("apdkit")
except PackageNotFoundError:  # running from a source tree
    APD_VERSION = "0+source"

# Every node of the store, named once.
ROOT_ATTR = "apd"  # {"format": int, "apd_version": str, "model": str}
TARGET = "target"  # attrs: ref (how to rebuild the module), arch, seed, source, health
TARGET_STATE = "target/state"  # one array per state_dict entry (params and buffers)
STAGE_STATUS_ATTR = "status"  # on each stage group: absent | running | done | failed
STAGE1 = "stage1"  # attrs: status, config, scores, message
STAGE1_PIECES = "stage1/pieces"  # <matrix>/U (C, d_out), <matrix>/V (C, d_in)
STAGE1_GATES = "stage1/gates"  # learned minimality only: <matrix>/w1, b1, w2 (C, H), b2 (C,)
STAGE1_METRICS = "stage1/metrics"  # <metric> (n_logged,), one row per log_every steps
STAGE1_EVAL = "stage1/eval"
STAGE1_EVAL_INPUTS = "stage1/eval/inputs"  # (n_eval, *input shape)
STAGE1_EVAL_SCORES = "stage1/eval/scores"  # <matrix> (n_rows, C) float32, n_rows = n_eval x positions
STAGE1_EVAL_MASKS = "stage1/eval/masks"  # <matrix> (n_rows, C) bool
GROUPINGS = "groupings"  # <name>/ attrs: status, config, method, n_groups, ranks, description_length, scores
GROUPING_LABELS = "labels"  # groupings/<name>/labels/<matrix> (C,) int32, -1 = dead
VERIFY = "verify"  # <grouping>/ attrs: status, passed, checks (figures and verdicts), config
CHECKPOINTS = "checkpoints"  # plain files, written to a temporary name then renamed
LOCK = ".apd.lock"  # held (flock) by the one process writing the store
LOCK_OWNER = ".apd.lock.owner"  # pid and command line of that process

PROVENANCE = "provenance"  # root attrs: versions, git commit, command line, creation time

STAGES = ("target", "stage1")


def provenance() -> dict[str, Any]:
    """Where a store came from: package and torch versions, the source's git
    commit when it runs from a checkout, the command line, the time."""
    import datetime
    import platform
    import subprocess

    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"apdkit_version": APD_VERSION, "torch_version": torch.__version__, "python": platform.python_version(),
            "git_commit": commit, "command": " ".join(sys.argv)[:500],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def weights_hash(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state_dict's names, shapes, dtypes and bytes, in name order."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class StoreError(Exception):
    """A store that cannot be used as asked; the message is one line."""


def _is_apd_store(path: Path) -> bool:
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return ROOT_ATTR in json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def _check_identity(attrs: Mapping[str, Any], path: Path, model: str | None) -> None:
    info = attrs[ROOT_ATTR]
    if info.get("format") != FORMAT_VERSION:
        raise StoreError(
            f"{path} was written by apd {info.get('apd_version', '?')} (store format {info.get('format')}); "
            f"this apd ({APD_VERSION}) reads format {FORMAT_VERSION}: use a new --store"
        )
    if model is not None and info.get("model") != model:
        raise StoreError(f"{path} holds a run of model {info.get('model')!r}, not {model!r}: use another --store")


def check_writable(path: Path, model: str) -> None:
    """Raise StoreError unless ``path`` is, or can become, a store of ``model``.
    Touches nothing."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise StoreError(f"{path} exists and is not a directory: not an apd store")
        if _is_apd_store(path):
            _check_identity(json.loads((path / "zarr.json").read_text())["attributes"], path, model)
        elif any(p.name not in (LOCK, LOCK_OWNER) for p in path.iterdir()):
            raise StoreError(f"{path} is a non-empty directory that is not an apd store: refusing to write there")
        if not os.access(path, os.W_OK | os.X_OK):
            raise StoreError(f"{path} is not writable")
    else:
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise StoreError(f"cannot create {path}: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise StoreError(f"cannot create {path}: {parent} is not writable")


_HELD: dict[str, list] = {}  # store path -> [FileLock, depth]: re-entrant within a process


@contextmanager
def writer_lock(path: Path, create: bool = False):
    """One writer at a time. An OS file lock in the store, released by the OS
    when the process dies (kill -9 never leaves it stuck); a second writer is
    refused at once, naming the process that holds it. ``create``: make the
    store's directory (stage 1, after every check passed)."""
    from filelock import FileLock, Timeout

    path = Path(path)
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    if create:
        path.mkdir(parents=True, exist_ok=True)
    elif not _is_apd_store(path):
        raise StoreError(f"{path} is not an apd store")
    lock = FileLock(str(path / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            owner = (path / LOCK_OWNER).read_text().strip()
        except OSError:
            owner = "unknown"
        raise StoreError(f"{path} is being written by another apd process ({owner}); "
                         "wait for it to finish, or stop it") from None
    (path / LOCK_OWNER).write_text(f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}")
    _HELD[key] = [lock, 1]
    try:
        yield
    finally:
        del _HELD[key]
        (path / LOCK_OWNER).unlink(missing_ok=True)
        lock.release()


def checkpoint_file(run_path: Path, stage: str) -> Path:
    return Path(run_path) / CHECKPOINTS / f"{stage}.pt"


def _set_attrs(group: zarr.Group, values: Mapping[str, Any]) -> None:
    """Merge ``values`` into a node's attributes in one atomic write. (zarr's
    ``attrs.update`` writes once per key: a kill between two keys could leave
    a stage marked done without its results.)"""
    group.attrs.put({**group.attrs.asdict(), **values})


CHECKSUMS_ATTR = "checksums"  # on each finished node: {array path: sha256 of its contents}


def _array_digest(arr: zarr.Array) -> str:
    import hashlib

    data = np.ascontiguousarray(np.asarray(arr[...]))
    h = hashlib.sha256(f"{data.shape}:{data.dtype};".encode())
    h.update(data.tobytes())
    return h.hexdigest()


def _arrays_under(root: zarr.Group, node: str) -> list[str]:
    """Paths of every array below ``node``."""
    group = root[node]
    return sorted(f"{node}/{path}" for path, child in group.members(max_depth=None) if isinstance(child, zarr.Array))


def _load_checkpoint(path: Path) -> dict:
    """Tensors and plain types only: a file that needs pickled code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StoreError(f"{path} is not a valid apd checkpoint (refused to load it: "
                         f"{str(e).strip().splitlines()[0][:120]})") from None


def _tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class RunStore:
    """Write access to one run."""

    def __init__(self, path: Path, model: str):
        self.path = Path(path)
        check_writable(self.path, model)
        self.root = zarr.open_group(str(self.path), mode="a")
        if ROOT_ATTR not in self.root.attrs:
            _set_attrs(self.root, {ROOT_ATTR: {"format": FORMAT_VERSION, "apd_version": APD_VERSION, "model": model},
                                   PROVENANCE: provenance()})
        self.model = model

    # -- stage status -------------------------------------------------------
    def stage_status(self, stage: str) -> str:
        if stage not in self.root:
            return "absent"
        return self.root[stage].attrs.get(STAGE_STATUS_ATTR, "absent")

    def set_stage(self, stage: str, status: str, **attrs: Any) -> None:
        """A node's status and attributes in one write; "done" also records
        a checksum of every array below it, checked whenever it is read."""
        group = self.root.require_group(stage)
        if status == "done":
            attrs[CHECKSUMS_ATTR] = {path: _array_digest(self.root[path]) for path in _arrays_under(self.root, stage)}
        _set_attrs(group, {STAGE_STATUS_ATTR: status, **attrs})

    def stage_attrs(self, stage: str) -> dict[str, Any]:
        return dict(self.root[stage].attrs) if stage in self.root else {}

    def reset_stage(self, stage: str) -> None:
        """Remove a stage's group and checkpoint (``--force``)."""
        if stage in self.root:
            shutil.rmtree(self.path / stage)
        ckpt = self.checkpoint_path(stage)
        if ckpt.exists():
            ckpt.unlink()
        self.root = zarr.open_group(str(self.path), mode="a")

    # -- target -------------------------------------------------------------
    def write_target(self, ref: Mapping[str, Any], state: Mapping[str, torch.Tensor], **attrs: Any) -> None:
        group = self.root.require_group(TARGET_STATE)
        for name, tensor in state.items():
            data = _tensor_to_numpy(tensor)
            group.create_array(name, data=data, overwrite=True,
                               dimension_names=[f"{name}.dim_{i}" for i in range(data.ndim)])
        self.set_stage(TARGET, "done", ref=dict(ref), weights_sha256=weights_hash(state), **attrs)

    # -- stage 2 ------------------------------------------------------------
    def write_grouping(self, name: str, labels: Mapping[str, np.ndarray], **attrs: Any) -> None:
        """Labels first, status last: a grouping is only 'done' once whole."""
        group = self.root.require_group(grouping_path(name))
        _set_attrs(group, {STAGE_STATUS_ATTR: "running"})
        lab = group.require_group(GROUPING_LABELS)
        for param, values in labels.items():
            lab.create_array(param, data=np.asarray(values, dtype=np.int32), overwrite=True,
                             dimension_names=[piece_dim(param, {len(v) for v in labels.values()})])
        self.set_stage(grouping_path(name), "done", **attrs)

    # -- stage 3 ------------------------------------------------------------
    def write_verify(self, grouping: str, result: Mapping[str, Any]) -> None:
        group = self.root.require_group(f"{VERIFY}/{grouping}")
        _set_attrs(group, {STAGE_STATUS_ATTR: "done", **result})

    # -- checkpoints --------------------------------------------------------
    def checkpoint_path(self, stage: str) -> Path:
        return checkpoint_file(self.path, stage)

    def save_checkpoint(self, stage: str, payload: dict) -> None:
        """Atomic: a reader sees the old checkpoint or the new one, never half."""
        final = self.checkpoint_path(stage)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_suffix(".pt.tmp")
        buf = io.BytesIO()
        torch.save(payload, buf)
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def load_checkpoint(self, stage: str) -> dict | None:
        path = self.checkpoint_path(stage)
        if not path.exists():
            return None
        return _load_checkpoint(path)

    # -- stage 1 ------------------------------------------------------------
    def write_stage1_pieces(self, pieces: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        group = self.root.require_group(STAGE1_PIECES)
        for name, (U, V) in pieces.items():
            sub = group.require_group(name)
            sub.create_array("U", data=_tensor_to_numpy(U).astype(np.float32), overwrite=True,
                             dimension_names=["piece", "d_out"])
            sub.create_array("V", data=_tensor_to_numpy(V).astype(np.float32), overwrite=True,
                             dimension_names=["piece", "d_in"])

    def write_stage1_gates(self, gates: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        group = self.root.require_group(STAGE1_GATES)
        for name, params in gates.items():
            sub = group.require_group(name)
            for key, value in params.items():
                data = _tensor_to_numpy(value).astype(np.float32)
                sub.create_array(key, data=data, overwrite=True,
                                 dimension_names=["piece", "gate_hidden"][:data.ndim])

    def write_stage1_metrics(self, history: list[dict[str, float]]) -> None:
        group = self.root.require_group(STAGE1_METRICS)
        if not history:
            return
        for key in history[0]:
            group.create_array(key, data=np.array([row[key] for row in history], dtype=np.float64), overwrite=True,
                               dimension_names=["log"])

    def create_eval_arrays(self, n: int, input_shape: tuple[int, ...], input_dtype: str, rows_per_input: int,
                           n_pieces: Mapping[str, int], chunk: int) -> dict:
        """Empty evaluation arrays, chunked along inputs (masks and scores:
        ``rows_per_input`` rows per input, one per position); filled by slices."""
        inputs = self.root.require_group(STAGE1_EVAL).create_array(
            "inputs", shape=(n, *input_shape), chunks=(chunk, *input_shape), dtype=input_dtype, overwrite=True,
            dimension_names=["sample", *(f"input_dim_{i + 1}" for i in range(len(input_shape)))])
        scores = self.root.require_group(STAGE1_EVAL_SCORES)
        masks = self.root.require_group(STAGE1_EVAL_MASKS)
        rows, row_chunk = n * rows_per_input, chunk * rows_per_input
        sizes = set(n_pieces.values())
        return {
            "inputs": inputs,
            "scores": {k: scores.create_array(k, shape=(rows, c), chunks=(row_chunk, c), dtype="float32",
                                              overwrite=True, dimension_names=["row", piece_dim(k, sizes)])
                       for k, c in n_pieces.items()},
            "masks": {k: masks.create_array(k, shape=(rows, c), chunks=(row_chunk, c), dtype="bool", overwrite=True,
                                            dimension_names=["row", piece_dim(k, sizes)])
                      for k, c in n_pieces.items()},
        }


def piece_dim(matrix: str, sizes: set[int]) -> str:
    """The pieces' dimension name: "piece" when every matrix has as many (so
    xarray can line them up), else one per matrix."""
    return "piece" if len(sizes) == 1 else f"piece.{matrix}"


def grouping_path(name: str) -> str:
    return f"{GROUPINGS}/{name}"


class Run:
    """Read access to a finished (or partial) run: the stable public API."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir() or not _is_apd_store(self.path):
            raise StoreError(f"{self.path} is not an apd store")
        self.root = zarr.open_group(str(self.path), mode="r")
        _check_identity(self.root.attrs, self.path, None)

    @property
    def model_name(self) -> str:
        return self.root.attrs[ROOT_ATTR]["model"]

    def provenance(self) -> dict[str, Any]:
        return dict(self.root.attrs.get(PROVENANCE, {}))

    def status(self, stage: str) -> str:
        return self.root[stage].attrs.get(STAGE_STATUS_ATTR, "absent") if stage in self.root else "absent"

    def attrs(self, stage: str) -> dict[str, Any]:
        return dict(self.root[stage].attrs) if stage in self.root else {}

    def _require(self, stage: str) -> None:
        if self.status(stage) != "done":
            raise StoreError(f"{self.path}: {stage} is {self.status(stage)}, not done")

    def damage(self, node: str) -> str | None:
        """None when every array a finished node recorded is there with its
        contents unchanged; else one line naming the damaged array."""
        for path, digest in self.attrs(node).get(CHECKSUMS_ATTR, {}).items():
            try:
                found = _array_digest(self.root[path])
            except KeyError:
                return f"{path} is missing"
            except Exception as e:  # unreadable metadata or chunk: zarr and codecs raise many types
                return f"{path} cannot be read ({type(e).__name__})"
            if found != digest:
                return f"{path} has changed (a chunk deleted or rewritten)"
        return None

    def check(self, *nodes: str) -> None:
        """Raise StoreError, in one line, if any of these finished nodes is damaged."""
        for node in nodes:
            problem = self.damage(node) if self.status(node) == "done" else None
            if problem is not None:
                rerun = {TARGET: "a new store", STAGE1: "apd stage1 --force"}.get(
                    node, "apd group --force" if node.startswith(GROUPINGS) else "the stage that wrote it")
                raise StoreError(f"{self.path} is damaged: {problem}; rerun {rerun} to rewrite it")

    def finished_nodes(self) -> list[str]:
        """Every node a finished stage wrote: target, stage1, each grouping."""
        nodes = [n for n in (TARGET, STAGE1) if self.status(n) == "done"]
        return nodes + [grouping_path(g) for g in self.groupings()]

    def target_state(self) -> dict[str, torch.Tensor]:
        self._require(TARGET)
        group = self.root[TARGET_STATE]
        return {name: torch.from_numpy(np.asarray(arr[...])) for name, arr in group.arrays()}

    def target_ref(self) -> dict[str, Any]:
        """How to rebuild the target module (model, layers, output, data)."""
        self._require(TARGET)
        return dict(self.attrs(TARGET)["ref"])

    def pieces(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{matrix: (U, V)}; piece c is torch.outer(U[c], V[c]), in the shape
        of the matrix's parameter."""
        self._require(STAGE1)
        group = self.root[STAGE1_PIECES]
        return {
            name: (torch.from_numpy(np.asarray(sub["U"][...])), torch.from_numpy(np.asarray(sub["V"][...])))
            for name, sub in sorted(group.groups())
        }

    def gates(self) -> dict[str, dict[str, torch.Tensor]]:
        """{matrix: {w1, b1, w2, b2}} of the learned gates (core/gates.py);
        empty for a stage 1 trained with top-k minimality."""
        self._require(STAGE1)
        if STAGE1_GATES not in self.root:
            return {}
        return {name: {k: torch.from_numpy(np.asarray(a[...])) for k, a in sub.arrays()}
                for name, sub in sorted(self.root[STAGE1_GATES].groups())}

    def config(self, stage: str = STAGE1) -> dict[str, Any]:
        return dict(self.attrs(stage).get("config", {}))

    def scores(self, stage: str = STAGE1) -> dict[str, float]:
        """The ground-truth and quality scores a stage computed at its end."""
        return dict(self.attrs(stage).get("scores", {}))

    def metrics(self) -> dict[str, np.ndarray]:
        """Training metrics, one row per logged step."""
        return {k: np.asarray(a[...]) for k, a in self.root[STAGE1_METRICS].arrays()}

    def eval_inputs(self) -> zarr.Array:
        self._require(STAGE1)
        return self.root[STAGE1_EVAL_INPUTS]

    def mask_rows_are_inputs(self) -> bool:
        """Whether stage 1's stored masks have one row per evaluation input
        (False where a row is one position of a sequence)."""
        return next(iter(self.masks().values())).shape[0] == self.eval_inputs().shape[0]

    def attribution_scores(self) -> dict[str, zarr.Array]:
        """{matrix: (n_rows, C) zarr array} of the final pieces' attributions."""
        self._require(STAGE1)
        return dict(sorted(self.root[STAGE1_EVAL_SCORES].arrays()))

    def groupings(self) -> list[str]:
        """Names of the finished groupings in this run."""
        if GROUPINGS not in self.root:
            return []
        return sorted(name for name, g in self.root[GROUPINGS].groups()
                      if g.attrs.get(STAGE_STATUS_ATTR) == "done")

    def grouping(self, name: str) -> dict[str, np.ndarray]:
        """{matrix: one int label per piece}; -1 marks dead pieces, and
        mechanism g is the sum of the pieces labelled g across all matrices."""
        if name not in self.groupings():
            have = ", ".join(self.groupings()) or "none"
            raise StoreError(f"{self.path} has no finished grouping {name!r} (has: {have})")
        group = self.root[grouping_path(name)][GROUPING_LABELS]
        return {param: np.asarray(arr[...]) for param, arr in sorted(group.arrays())}

    def grouping_info(self, name: str) -> dict[str, Any]:
        """A grouping's attributes: method, settings, ranks, description length, scores."""
        self.grouping(name)
        return dict(self.root[grouping_path(name)].attrs)

    def verification(self, grouping: str) -> dict[str, Any] | None:
        """The last ``apd verify`` result for a grouping, or None."""
        path = f"{VERIFY}/{grouping}"
        return dict(self.root[path].attrs) if path in self.root else None

    def eval_masks_dask(self, names: list[str]):
        """Stage 1's evaluation masks of the named matrices, side by side as
        one lazy (n_rows, sum of C) dask array, chunked as stored."""
        import dask.array as da

        self._require(STAGE1)
        return da.concatenate([da.from_zarr(str(self.path), component=f"{STAGE1_EVAL_MASKS}/{n}") for n in names],
                              axis=1)

    def checkpoint_step(self, stage: str) -> int | None:
        """The step of a stage's last checkpoint, or None when it has none."""
        path = checkpoint_file(self.path, stage)
        return int(_load_checkpoint(path)["state"]["step"]) if path.exists() else None

    def masks(self) -> dict[str, zarr.Array]:
        """{matrix: (n_rows, C) bool zarr array}: the batch top-k active pieces."""
        self._require(STAGE1)
        return dict(sorted(self.root[STAGE1_EVAL_MASKS].arrays()))


def open_run(path: str | os.PathLike) -> Run:
    return Run(Path(path))


def iter_chunks(n: int, chunk: int) -> Iterator[slice]:
    for start in range(0, n, chunk):
        yield slice(start, min(n, start + chunk))
