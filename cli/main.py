"""The ``apd`` command: parse flags, call a pipeline function, print, exit.

Every expected failure (bad model name, bad config, foreign store, NaN loss)
becomes one line on stderr and exit code 2; nothing else is done here.
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from rich.text import Text

from apdkit.cli.progress import make_reporter
from apdkit.core.model import TargetError
from apdkit.stages.config import ConfigError
from apdkit.stages.errors import StageError
from apdkit.stores.run import StoreError
from apdkit.targets.registry import TARGETS, UnknownTarget

EXPECTED_ERRORS = (ConfigError, StageError, StoreError, UnknownTarget, TargetError)

app = typer.Typer(
    name="apd",
    help=(
        "Attribution-based Parameter Decomposition.\n\n"
        "Workflow: `apd run --model tms_5-2` does everything into runs/tms_5-2.zarr; or stage by stage: "
        "`apd stage1 --model tms_5-2` trains the target (cached in the store) and learns rank-1 "
        "pieces of its weights; `apd group --model tms_5-2` groups them into mechanisms; "
        "`apd verify --model tms_5-2` re-checks the mechanisms; `apd status runs/tms_5-2.zarr` shows what a store holds. "
        f"Built-in targets: {', '.join(TARGETS)}. Your own model: --model mypkg.models:build --data mypkg.data:sample "
        "--modules 'blocks.*.mlp.*' (or hf:NAME, or a target YAML)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
console = Console()
VERBOSE = {"on": False}  # set by the -v option on the app, read when a reporter is made


def _version(show: bool) -> None:
    if show:
        from apdkit.stores.run import APD_VERSION

        print(f"apdkit {APD_VERSION}")
        raise typer.Exit(0)


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v", help="log details (target health, "
                                          "resume points, training metrics) besides the progress bars"),
             version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="print the version and exit")) -> None:
    VERBOSE["on"] = verbose


def reporter(quiet: bool):
    return make_reporter(quiet, VERBOSE["on"])


def _fail(message: str) -> None:
    from apdkit.pipeline.launch import is_follower

    if is_follower():  # one line from rank 0 is enough
        raise typer.Exit(2)
    # user text is printed as plain text: no markup is interpreted in it
    err_console.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def user_errors(path: Path):
    """Expected failures become one line and exit code 2; Ctrl-C says how to resume."""
    try:
        yield
    except EXPECTED_ERRORS as e:
        _fail(str(e))
    except OSError as e:  # disk full, permissions changed under us: say so, keep the store
        _fail(f"{e.filename or path}: {e.strerror or e}")
    except KeyboardInterrupt:
        err_console.print("interrupted: rerun the same command to resume from the last checkpoint")
        raise typer.Exit(130)


@contextmanager
def tracked(kind: Optional[str], store: Path, name: str):
    """A metrics callback for --log-to (None when not asked for)."""
    if kind is None:
        yield None
        return
    from apdkit.pipeline.trackers import Tracker

    tracker = Tracker(kind, store, name)
    try:
        yield tracker.log
    finally:
        tracker.close()


def default_store(model: str) -> Path:
    """runs/<model>.zarr, the model name made a plain file name."""
    stem = Path(model).stem if model.endswith((".yaml", ".yml")) else model
    return Path("runs") / (re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") + ".zarr")


MODEL_HELP = ("built-in target name, your model factory as module:function, hf:NAME_OR_PATH, "
              "or a target YAML (model, kwargs, data, modules, output, hidden, insert_identity)")


def target_ref(model: str, data, modules, output, insert_identity, hidden):
    from apdkit.targets.load import resolve_ref

    return resolve_ref(model, tuple(modules or ()), output, tuple(hidden or ()), tuple(insert_identity or ()), data)


def _print_scores(title: str, scores: dict[str, float], store: Path) -> None:
    table = Table(title=Text(title), show_header=True)
    table.add_column("score")
    table.add_column("value", justify="right")
    for key, value in scores.items():
        table.add_row(Text(key), f"{value:.6g}")
    console.print(table)
    _print_missed(store, scores)


def _print_missed(store: Path, scores: dict[str, float]) -> None:
    from apdkit.pipeline.status import missed_criteria

    for line in missed_criteria(store, scores):
        console.print(Text("MISSED: " + line, style="red"))


@app.command()
def stage1(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: Optional[str] = typer.Option(None, help="your model's inputs: module:callable sample(n, generator), "
                                       "module:iterable of batches, or a .pt/.npy file"),
    modules: Optional[list[str]] = typer.Option(None, "--modules", help="glob over module names of the layers to "
                                                "decompose (repeat for several)"),
    output: Optional[str] = typer.Option(None, help="which output to attribute, e.g. logits"),
    insert_identity: Optional[list[str]] = typer.Option(None, "--insert-identity", help="put a frozen identity "
                                                        "in front of the matched layers and decompose it too"),
    hidden: Optional[list[str]] = typer.Option(None, "--hidden", help="modules whose outputs the minimality "
                                               "loss also matches"),
    store: Optional[Path] = typer.Option(None, help="run directory (default runs/<model>.zarr)"),
    config: Optional[Path] = typer.Option(None, help="YAML file of stage-1 settings"),
    steps: Optional[int] = typer.Option(None, help="training steps (after the warm start)"),
    seed: Optional[int] = typer.Option(None, help="seed for target training, data and init"),
    device: Optional[str] = typer.Option(None, help="auto (the GPU when there is one, the default) | cpu | cuda"),
    target_file: Optional[Path] = typer.Option(None, help="a state_dict of a built-in architecture to decompose instead of training one"),
    force: bool = typer.Option(False, help="rerun a finished stage from scratch"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the loss and its "
                                           "gradient (CUDA graphs on a GPU)"),
    precision: Optional[str] = typer.Option(None, help="float32 (default) | bfloat16 (autocast)"),
    attribution: Optional[str] = typer.Option(None, help="how pieces are attributed: gradient (default) | integrated_gradients | ablation"),
    log_to: Optional[str] = typer.Option(None, "--log-to", help="also send training metrics to tensorboard "
                                         "(<store>/tensorboard) or wandb (needs its extra)"),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="data-parallel processes on this machine "
                                        "(torch.distributed; torchrun works too); same pieces as one process"),
    as_json: bool = typer.Option(False, "--json", help="print the scores as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Learn rank-1 pieces of every decomposed matrix (APD objective)."""
    from apdkit.pipeline.api import stage1_config
    from apdkit.pipeline.launch import is_follower, is_replica, launch, without_option
    from apdkit.stages.stage1.stage import run_stage1

    if nproc is not None and nproc > 1 and not is_replica():
        raise typer.Exit(launch(nproc, without_option(sys.argv[1:], "--nproc")))
    path = store or default_store(model)
    silent = is_follower()
    with user_errors(path):
        ref = target_ref(model, data, modules, output, insert_identity, hidden)
        cfg = stage1_config(ref, config, steps=steps, seed=seed, device=device, compile=compile, precision=precision,
                            attribution=attribution)
        with reporter(quiet or as_json or silent) as rep, \
                tracked(None if silent else log_to, path, ref.model) as on_metrics:
            scores = run_stage1(path, ref, cfg, force=force, target_file=target_file, reporter=rep,
                                on_metrics=on_metrics)
    if silent:
        return
    if as_json:
        print(json.dumps(scores, indent=2))
    else:
        _print_scores(f"stage1 scores ({path})", scores, path)


def _find_store(store: Optional[Path], model: Optional[str]) -> Path:
    if store is not None:
        return store
    if model is not None:
        return default_store(model)
    found = sorted(Path("runs").glob("*.zarr")) if Path("runs").is_dir() else []
    if len(found) == 1:
        return found[0]
    _fail("give --store PATH (or --model NAME for runs/NAME.zarr)")


@app.command()
def group(
    method: Optional[str] = typer.Option(None, help="spectral (default; a built-in target may name another: induction and induction-sink use mdl) | louvain | leiden | mdl | threshold | auto (lowest description length)"),
    store: Optional[Path] = typer.Option(None, help="run directory (default: runs/<model>.zarr, or the only store in runs/)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="find the store as runs/<model>.zarr"),
    n_groups: Optional[int] = typer.Option(None, help="spectral: number of groups (default: automatic)"),
    alpha: Optional[float] = typer.Option(None, help="description length: cost per input per unit of rank"),
    threshold: Optional[float] = typer.Option(None, help="threshold: Jaccard co-activation for an edge"),
    resolution: Optional[float] = typer.Option(None, help="louvain/leiden resolution"),
    samples: Optional[int] = typer.Option(None, help="inputs to collect co-activation on (more than stored: new ones are drawn)"),
    shared_pieces: Optional[str] = typer.Option(None, help="own (default): a piece that two mechanisms never "
                                                "active together use about equally becomes its own mechanism | "
                                                "method: it stays where the method put it"),
    always_on: Optional[str] = typer.Option(None, help="own (default): each module's part of a mechanism that is "
                                            "on for (almost) every input becomes its own mechanism | "
                                            "method: it stays where the method put it"),
    name: Optional[str] = typer.Option(None, help="name of the grouping in the store (default: the method)"),
    config: Optional[Path] = typer.Option(None, help="YAML file of grouping settings"),
    scheduler: Optional[str] = typer.Option(None, help="address of a dask.distributed scheduler (default: local threads)"),
    force: bool = typer.Option(False, help="redo a finished grouping of the same name"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
) -> None:
    """Group co-activating rank-1 pieces into higher-rank mechanisms."""
    from apdkit.pipeline.api import group_config, stored_ref
    from apdkit.stages.group.stage import run_group

    path = _find_store(store, model)
    with user_errors(path):
        cfg = group_config(stored_ref(path), config, method=method, n_groups=n_groups, alpha=alpha,
                           threshold=threshold, resolution=resolution, samples=samples, name=name,
                           shared_pieces=shared_pieces, always_on=always_on)
        client = _dask_client(scheduler)
        try:
            with reporter(quiet or as_json) as rep:
                summary = run_group(path, cfg, scheduler=client, force=force, reporter=rep)
        finally:
            if client is not None:
                client.close()
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    flat = {
        "method": summary["method"], "groups": summary["n_groups"], "alive pieces": summary["n_alive"],
        "inputs": summary["n_samples"], "description length / input": round(summary["description_length_per_input"], 4),
        "mechanism ranks (rank: count)": summary["group_rank_histogram"],
        **{f"truth {k}": round(v, 4) for k, v in summary.get("scores", {}).items()},
    }
    table = Table(title=Text(f"grouping {cfg.grouping_name!r} ({path})"))
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in flat.items():
        table.add_row(Text(k), Text(str(v)))
    console.print(table)
    _print_missed(path, summary.get("scores", {}))


@app.command()
def verify(
    store: Optional[Path] = typer.Option(None, help="run directory (default: runs/<model>.zarr, or the only store in runs/)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="find the store as runs/<model>.zarr"),
    method: Optional[str] = typer.Option(None, "--method", help="name of the grouping to verify (default: the only one)"),
    samples: Optional[int] = typer.Option(None, help="fresh inputs for the minimality check"),
    config: Optional[Path] = typer.Option(None, help="YAML file of verify settings (thresholds)"),
    device: str = typer.Option("auto", help="auto (the GPU when there is one) | cpu | cuda"),
    attribution: Optional[str] = typer.Option(None, help="how mechanisms are attributed: gradient | "
                                              "integrated_gradients | ablation (default: as stage 1)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
) -> None:
    """Re-check a grouping: faithfulness, minimality, simplicity, and the inactive mechanisms under random,
    resampled and adversarial masks. Exit 0 when every check passes, 1 otherwise."""
    from apdkit.stages.config import resolve_verify
    from apdkit.stages.verify.stage import run_verify

    path = _find_store(store, model)
    with user_errors(path):
        cfg = resolve_verify(config, grouping=method, samples=samples, attribution=attribution)
        with reporter(quiet or as_json) as rep:
            result = run_verify(path, cfg, reporter=rep, device=device)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_verify(result, path)
    raise typer.Exit(0 if result["passed"] else 1)


def print_verify(result: dict, store: Path) -> None:
    table = Table(title=Text(f"verify grouping {result['grouping']!r} on {result['samples']} fresh inputs"))
    for col in ("check", "verdict", "figure", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for check, body in result["checks"].items():
        verdict = "[green]pass[/]" if body["passed"] else "[red]FAIL[/]"
        for i, (k, v) in enumerate(body["figures"].items()):
            table.add_row(check if i == 0 else "", verdict if i == 0 else "", k,
                          f"{v:.4g}" if isinstance(v, float) else str(v))
        table.add_row("", "", f"[dim]threshold: {body['threshold']}[/]", "")
    console.print(table)
    if result.get("truth"):
        _print_scores("ground truth (fresh inputs)", result["truth"], store)
    failed = [c for c, b in result["checks"].items() if not b["passed"]]
    console.print("all checks passed" if not failed else f"[red]failed:[/] {', '.join(failed)}")


def _dask_client(address: Optional[str]):
    """Connect to a dask.distributed scheduler; its client becomes dask's default."""
    if address is None:
        return None
    try:
        from dask.distributed import Client
    except ImportError:
        raise StageError("--scheduler needs dask.distributed: pip install 'dask[distributed]'") from None
    try:
        return Client(address, timeout=10)
    except (OSError, TimeoutError) as e:
        raise StageError(f"cannot reach dask scheduler {address}: {e}") from None


@app.command("run")
def run_all(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: Optional[str] = typer.Option(None, help="your model's inputs (as for stage1)"),
    modules: Optional[list[str]] = typer.Option(None, "--modules", help="glob over module names of the layers to decompose"),
    output: Optional[str] = typer.Option(None, help="which output to attribute, e.g. logits"),
    insert_identity: Optional[list[str]] = typer.Option(None, "--insert-identity", help="identity insertion sanity check"),
    hidden: Optional[list[str]] = typer.Option(None, "--hidden", help="modules whose outputs minimality also matches"),
    store: Optional[Path] = typer.Option(None, help="run directory (default runs/<model>.zarr)"),
    config: Optional[Path] = typer.Option(None, help="YAML file of stage-1 settings"),
    method: Optional[str] = typer.Option(None, help="grouping method (default spectral; a built-in target may name another: induction and induction-sink use mdl)"),
    steps: Optional[int] = typer.Option(None, help="stage-1 training steps (after the warm start)"),
    seed: Optional[int] = typer.Option(None, help="seed for target training, data and init"),
    device: Optional[str] = typer.Option(None, help="auto (the GPU when there is one, the default) | cpu | cuda"),
    attribution: Optional[str] = typer.Option(None, help="how pieces are attributed: gradient (default) | integrated_gradients | ablation"),
    force: bool = typer.Option(False, help="rerun every stage from scratch (the target is kept)"),
    log_to: Optional[str] = typer.Option(None, "--log-to", help="also send training metrics to tensorboard or wandb"),
    as_json: bool = typer.Option(False, "--json", help="print the verify result as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """The whole pipeline: target, stage 1, grouping, verify. Rerun to resume; finished stages are skipped."""
    from apdkit.pipeline.api import group_config, stage1_config
    from apdkit.pipeline.run import run_pipeline
    from apdkit.stages.config import resolve_verify

    path = store or default_store(model)
    with user_errors(path):
        ref = target_ref(model, data, modules, output, insert_identity, hidden)
        s1 = stage1_config(ref, config, seed=seed, steps=steps, device=device, attribution=attribution)
        grp = group_config(ref, None, method=method)
        ver = resolve_verify(None)
        with reporter(quiet or as_json) as rep, tracked(log_to, path, ref.model) as on_metrics:
            result = run_pipeline(path, ref, s1, grp, ver, rep, force=force, on_metrics=on_metrics)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_verify(result, path)
        _print_missed_in_store(path, result["grouping"], result.get("truth", {}))
    raise typer.Exit(0 if result["passed"] else 1)


def _print_missed_in_store(store: Path, grouping: str, printed: dict[str, float]) -> None:
    """Flag the stage-1 and grouping ground-truth scores that miss their
    criteria, except those already flagged with the same value (``printed``:
    verify's scores, which for some targets are the grouping's own)."""
    from apdkit import open_run

    run = open_run(store)
    for scores in (run.attrs("stage1").get("scores", {}), run.grouping_info(grouping).get("scores", {})):
        _print_missed(store, {k: v for k, v in scores.items() if printed.get(k) != v})


@app.command()
def report(
    store_arg: Optional[Path] = typer.Argument(None, metavar="[STORE]", help="run directory (or --store)"),
    store: Optional[Path] = typer.Option(None, help="run directory (default: the only store in runs/)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="find the store as runs/<model>.zarr"),
    out: Optional[Path] = typer.Option(None, help="HTML file to write (default: <store>/report.html)"),
    method: Optional[str] = typer.Option(None, "--method", help="grouping to show (default: the first)"),
) -> None:
    """Write a self-contained HTML page with figures about a run."""
    from apdkit.report.html import write_report

    path = _find_store(store or store_arg, model)
    with user_errors(path):
        written = write_report(path, out or path / "report.html", method)
    console.print(Text(f"wrote {written}"))


@app.command()
def status(
    store_arg: Optional[Path] = typer.Argument(None, metavar="[STORE]", help="run directory (or --store)"),
    store: Optional[Path] = typer.Option(None, help="run directory (default: the only store in runs/)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="find the store as runs/<model>.zarr"),
    as_json: bool = typer.Option(False, "--json", help="print the rows as JSON"),
    check: bool = typer.Option(True, "--check/--no-check", help="re-read every array against its checksum "
                               "(default; --no-check is faster on large stores)"),
) -> None:
    """Show what a store holds: each stage's state and key figures. A damaged store is an error naming the node."""
    from apdkit.pipeline.status import store_status

    path = _find_store(store or store_arg, model)
    with user_errors(path):
        rows = store_status(path, check=check)
    if as_json:
        print(json.dumps([{"stage": r[0], "status": r[1], "detail": r[2]} for r in rows], indent=2))
        return
    table = Table(title=Text(str(path)))
    for col in ("stage", "status", "detail"):
        table.add_column(col)
    for row in rows:
        table.add_row(*(Text(str(c)) for c in row))
    console.print(table)


config_app = typer.Typer(help="Show the settings a command would use.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    stage: str = typer.Option("stage1", help="stage1 | group | verify"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="a built-in target: its stage-1 or grouping defaults"),
    config: Optional[Path] = typer.Option(None, help="a YAML file to resolve on top of the defaults"),
    comments: bool = typer.Option(False, help="each setting's description above it"),
) -> None:
    """Print the fully resolved settings as YAML that --config accepts back unchanged."""
    from apdkit.stages.config import resolve_group, resolve_stage1, resolve_verify, to_yaml
    from apdkit.targets.registry import get_target

    with user_errors(Path(".")):
        if stage == "stage1":
            cfg = resolve_stage1(dict(get_target(model).stage1) if model else {}, config)
        elif stage == "group":
            cfg = resolve_group(config, dict(get_target(model).group) if model else None)
        elif stage == "verify":
            cfg = resolve_verify(config)
        else:
            raise ConfigError(f"unknown stage {stage!r}: stage1, group or verify")
    print(to_yaml(cfg, comments), end="")


def main() -> None:  # pragma: no cover - console entry point
    app()

