"""`kilolora compress` and `kilolora bank ...`: build, inspect, export and grow adapter banks.

`compression` (and so torch) is imported inside the commands: `kilolora --help` stays fast.
"""

from __future__ import annotations

import json as jsonlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from compression import Bank

err_console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


def compress(
    adapters: list[str],
    *,
    out: str,
    method: Literal["jd-full", "jd-diag", "svd"] = "jd-full",
    rank: int = 16,
    clusters: int = 1,
    iters: int | None = None,
    tol: float = 1e-4,
    weighting: Literal["uniform", "relative"] = "uniform",
    cluster_iters: int = 10,
    min_cluster_size: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: Literal["float32", "float16", "bfloat16"] | None = None,
    overwrite: bool = False,
    json: bool = False,
) -> None:
    """Compress PEFT LoRA adapters into a shared-basis bank.

    Every adapted layer (target) gets shared bases U (d_out×r), V (d_in×r) per cluster and each
    adapter a tiny core: ΔW_i ≈ U Σ_i Vᵀ ("Compress then Serve", ICML 2025). The bank is
    written atomically: a failed or interrupted run leaves no output directory behind, and
    --overwrite swaps the new bank in so that a bank is at OUT at every moment.

    Example:
      kilolora compress adapters/ -o bank/ --method jd-full --rank 16 --clusters 4

    Args:
      adapters: PEFT adapter directories, globs, or directories that contain adapter directories.
      out: output bank directory (must not exist unless --overwrite; never an input adapter directory,
        one that contains one, or one inside one).
      method: jd-full (full r×r cores), jd-diag (diagonal cores) or svd (per-adapter truncation).
      rank: rank r of the shared bases.
      clusters: number of adapter clusters, each with its own bases (jd methods).
      iters: maximum alternating iterations of each final fit (default: 100 for jd-full, 500 for jd-diag).
      tol: a fit has converged once an iteration lowers its objective by less than TOL × the previous value.
      weighting: uniform minimises the total squared error Σ‖ΔW−ΔŴ‖²; relative minimises the squared
        relative errors Σ‖ΔW−ΔŴ‖²/‖ΔW‖², so adapters with large norms don't dominate the bases.
      cluster_iters: maximum reassignment rounds when clusters > 1.
      min_cluster_size: fewest adapters per cluster (default: ⌈n/(4·clusters)⌉, keeps clusters from collapsing).
      seed: random seed; the same seed gives the same bank.
      device: cpu or cuda (falls back to cpu, with a warning, without a GPU).
      dtype: dtype of the stored bank (default: the adapters' dtype).
      overwrite: replace OUT if it is an existing bank (a directory with bank.json); anything else
        at OUT (a file, another directory) is refused, never deleted.
      json: print the summary as JSON on stdout.
    """
    from compression import CompressConfig, load_collection
    from compression import compress as compress_collection
    from compression.bank import check_output
    from compression.peft_io import find_adapter_dirs

    out_path = Path(out)
    check_output(out_path, overwrite)  # before the fit; also restores a bank an interrupted overwrite left aside
    dirs = find_adapter_dirs(adapters)
    _refuse_inputs_at(out_path, dirs)
    cfg = CompressConfig(
        method=method, rank=rank, clusters=clusters, iters=iters, tol=tol, weighting=weighting,
        cluster_iters=cluster_iters, min_cluster_size=min_cluster_size, seed=seed, device=device, dtype=dtype,
    )
    t0 = time.perf_counter()
    with _progress() as bar:
        task = bar.add_task("loading", total=len(dirs))
        collection = load_collection([str(d) for d in dirs], progress=lambda k: bar.advance(task, k))
        tasks: dict[str, int] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done)

        bank = compress_collection(collection, cfg, progress=report)
    bank.save(out_path, overwrite=overwrite)
    seconds = time.perf_counter() - t0
    _print_summary(bank, out_path, seconds, json)


def _refuse_inputs_at(out: Path, dirs: list[Path]) -> None:
    """-o must not be, contain or lie inside an input adapter directory: --overwrite would delete it."""
    target = out.resolve()
    for d in dirs:
        src = d.resolve()
        if target == src or target in src.parents or src in target.parents:
            relation = "is" if target == src else "contains" if target in src.parents else "is inside"
            raise ValueError(f"-o {out} {relation} the input adapter directory {d}; write the bank elsewhere")


def bank_info(bank_dir: str, json: bool = False, top: int = 10) -> None:
    """Show a bank's sizes, savings and reconstruction errors.

    Errors are relative Frobenius norms over the whole adapter: ‖ΔW − UΣVᵀ‖_F / ‖ΔW‖_F with
    all of its targets stacked.

    Args:
      bank_dir: the bank directory.
      json: print bank statistics and adapters as JSON.
      top: how many adapters with the largest errors to list.
    """
    from compression import Bank

    bank = Bank.load(bank_dir)
    _print_summary(bank, Path(bank_dir), None, json, top)


def bank_export(bank_dir: str, name: str, *, out: str) -> None:
    """Write one adapter of a bank back as a PEFT adapter directory (B' = U Σ_i, A' = Vᵀ).

    Args:
      bank_dir: the bank directory.
      name: the adapter's name in the bank (see `kilolora bank info`).
      out: output PEFT directory (must not exist).
    """
    from compression import Bank

    bank = Bank.load(bank_dir)
    path = bank.export(name, out)
    entry = bank.entry(name)
    print(f"exported {name!r} (cluster {entry.cluster}, rel. error {entry.rel_error:.3g}) to {path}")


def bank_add(bank_dir: str, adapter_dir: str, name: str | None = None) -> None:
    """Add a PEFT adapter to a bank by projecting it onto the best cluster's basis.

    Nothing is recompressed: Σ = Uᵀ ΔW V on the existing bases; the adapter's reconstruction
    error is recorded. The bank is rewritten atomically.

    Args:
      bank_dir: the bank directory (updated in place).
      adapter_dir: the PEFT adapter directory to add.
      name: name in the bank (default: the directory name).
    """
    from compression import Bank, load_adapter

    bank = Bank.load(bank_dir)
    entry = bank.add(load_adapter(adapter_dir), name=name)
    bank.save(bank_dir, overwrite=True)
    print(
        f"added {entry.name!r} to {bank_dir}: cluster {entry.cluster}, index {entry.index}, "
        f"rel. error {entry.rel_error:.3g}"
    )


def make_collection(
    *,
    out: str,
    n: int = 200,
    groups: int = 4,
    layers: int = 2,
    hidden: int = 256,
    r: int = 8,
    shared_rank: int = 8,
    noise: float = 0.01,
    seed: int = 0,
) -> None:
    """Write a synthetic collection of PEFT adapters with planted shared structure.

    Adapters of the same group share column and row spaces per target (plus noise), which is
    what a compressor should find. For trying `kilolora compress` without real adapters.

    Args:
      out: output directory; adapters go to OUT/adapter_0000, ...
      n: number of adapters.
      groups: number of planted groups (try --clusters equal to it).
      layers: decoder layers, each with q_proj and v_proj targets.
      hidden: hidden size (v_proj maps hidden to hidden/4).
      r: rank of every adapter.
      shared_rank: rank of each group's shared bases.
      noise: noise added to the planted factors (relative).
      seed: random seed.
    """
    from compression.synthetic import PlantedSpec, write_planted

    if Path(out).exists():
        raise ValueError(f"output directory already exists: {out}")
    for field, value in (("n", n), ("groups", groups), ("layers", layers), ("hidden", hidden), ("r", r), ("shared_rank", shared_rank)):
        if value < 1:
            raise ValueError(f"--{field.replace('_', '-')} must be >= 1; got {value}")
    spec = PlantedSpec(
        n=n,
        modules=(("q_proj", hidden, hidden), ("v_proj", hidden, max(hidden // 4, 1))),
        layers=layers,
        r=r,
        shared_rank=shared_rank,
        groups=groups,
        noise=noise,
        seed=seed,
    )
    with _progress() as bar:
        task = bar.add_task("writing", total=n)
        write_planted(out, spec, progress=lambda k: bar.advance(task, k))
    print(f"wrote {n} adapters ({groups} planted groups, {layers * 2} targets, r={r}) to {out}")


def _fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _fmt_bytes(x: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} B"


def _print_summary(bank: Bank, path: Path, seconds: float | None, as_json: bool, top: int = 5) -> None:
    stats = bank.stats()
    if as_json:
        payload = {"bank": str(path), **stats, "history": bank.history}
        if seconds is not None:
            payload["seconds"] = seconds
        payload["adapters_detail"] = [
            {"name": e.name, "index": e.index, "cluster": e.cluster, "rel_error": e.rel_error, "source": e.source}
            for e in bank.entries
        ]
        print(jsonlib.dumps(payload, indent=1))
        return
    out = Console(file=sys.stdout)
    t = Table(title=f"kilolora bank {path}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("method", f"{stats['method']}, rank {stats['rank']}, {stats['clusters']} cluster(s)")
    t.add_row("adapters / targets", f"{stats['adapters']} / {stats['targets']}")
    t.add_row(
        "parameters",
        f"{_fmt_count(stats['params_before'])} → {_fmt_count(stats['params_after'])} "
        f"([green]{100 * stats['params_saved']:.1f}% saved[/green])",
    )
    t.add_row("bytes", f"{_fmt_bytes(stats['bytes_before'])} → {_fmt_bytes(stats['bytes_after'])} ({bank.dtype})")
    t.add_row(
        "rel. error",
        f"mean {stats['rel_error_mean']:.4g}, max {stats['rel_error_max']:.4g}   (‖ΔW−UΣVᵀ‖_F / ‖ΔW‖_F per adapter)",
    )
    fit = bank.history.get("fit", [])
    if fit:
        what = "Σ(‖ΔW−ΔŴ‖²/‖ΔW‖²) / n" if bank.history.get("weighting") == "relative" else "Σ‖ΔW−ΔŴ‖² / Σ‖ΔW‖²"
        shown = [f"{h:.4g}" for h in fit]
        if len(shown) > 12:  # fits run to convergence, up to hundreds of iterations: the start and the end
            shown = [*shown[:6], "…", *shown[-6:]]
        t.add_row("objective", "  ".join(shown) + f"   ({what} per iteration)")
    if stats.get("fit_iterations_max") is not None and stats.get("fit_converged") is not None:
        t.add_row(
            "iterations",
            f"max {stats['fit_iterations_max']}, mean {stats['fit_iterations_mean']:.1f} per target and cluster; "
            f"{100 * stats['fit_converged']:.0f}% converged (tol {bank.history.get('tol')})",
        )
    rounds = bank.history.get("clustering", [])
    if rounds:
        t.add_row("clustering", f"{len(rounds)} round(s), sizes {stats['cluster_sizes']}")
    if seconds is not None:
        t.add_row("time", f"{seconds:.2f} s")
    out.print(t)
    worst = sorted(bank.entries, key=lambda e: -e.rel_error)[:top]
    if worst and top > 0:
        w = Table(title=f"largest errors (top {len(worst)})", title_justify="left")
        for col in ("adapter", "cluster", "rel. error", "source"):
            w.add_column(col)
        for e in worst:
            w.add_row(e.name, str(e.cluster), f"{e.rel_error:.4g}", e.source)
        out.print(w)
