"""`kilolora world sweep`: choose the task bank by sweeping compression methods, ranks and
cluster counts over a built world's task family.

Every candidate bank is fitted to the world's uncompressed adapters (`adapters/`), served by the
engine and scored on inputs of the TRAINING split: the held-out split stays untouched for
`world eval` to report the chosen bank honestly. The base and the uncompressed adapters are
scored once. Per candidate the sweep records size, reconstruction error, accuracy, the
normalised score (bank − base) / (uncompressed − base) overall and per role, the per-task
verifiers' AUROC against the uncompressed ones', and how often the bank's outputs equal the
uncompressed adapters'. Then it chooses (`choose`: the targets of "Compress then Serve",
Brüel-Gabrielsson et al., ICML 2025: > 95% of parameters saved at ≥ 95% normalised score) and
finds where quality starts to fall with reconstruction error (`knee`).

```
OUT/sweep.json        settings, fingerprint, reference scores, one row per candidate, choice, knee
OUT/reference.json    the base's and the uncompressed adapters' per-item results (for resuming)
OUT/sweep_saved.png   normalised score vs parameters saved, per method, targets and choice
OUT/sweep_error.png   normalised score vs mean reconstruction error, knee
```

sweep.json is rewritten after every candidate; a rerun with the same world and settings reuses
the finished rows (`reused: true`), a different world, per_task, seed or dtype starts afresh.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import data
from .evaluate import TaskItems, TaskScores, normalised, score_tasks, summarize_tasks, task_items
from .world import World

SWEEP_FORMAT = 1
METHODS = ("svd", "jd-diag", "jd-full")
DTYPES = ("float32", "float16", "bfloat16")
PLOTS = ("sweep_saved.png", "sweep_error.png")
INSTALL_PLOTS = "pip install 'kilolora[plots]'"


@dataclass(frozen=True)
class Candidate:
    """One bank of the sweep."""

    method: str
    """svd | jd-diag | jd-full"""
    rank: int
    """rank of the shared bases (of each adapter's truncation for svd)"""
    clusters: int = 1
    """adapter clusters (always 1 for svd, which keeps one basis per adapter)"""

    @property
    def key(self) -> str:
        return f"{self.method}:{self.rank}:{self.clusters}"

    @property
    def label(self) -> str:
        return f"{self.method} r{self.rank}" + (f" k{self.clusters}" if self.method != "svd" else "")


def candidates(methods: Iterable[str], ranks: Iterable[int], clusters: Iterable[int]) -> list[Candidate]:
    """The product methods × ranks × clusters, in that order (svd once per rank: it has no clusters)."""
    return normalise_candidates(Candidate(m, r, k) for m, r, k in itertools.product(methods, ranks, clusters))


def parse_grid(text: str) -> list[Candidate]:
    """`method:rank:clusters,...` (clusters may be left off: 1) as candidates."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        fields = part.split(":")
        if not part or len(fields) not in (2, 3) or not all(f.strip().lstrip("-").isdigit() for f in fields[1:]):
            raise ValueError(f"--grid entries are method:rank:clusters (e.g. jd-full:16:8), got {part!r}")
        out.append(Candidate(fields[0].strip(), *(int(f) for f in fields[1:])))
    return normalise_candidates(out)


def normalise_candidates(cands: Iterable[Candidate | tuple], n_adapters: int | None = None) -> list[Candidate]:
    """Check each candidate; svd gets clusters=1, clusters are capped at `n_adapters` (as the
    world's build caps them); duplicates after that are dropped (first one kept)."""
    out: list[Candidate] = []
    for c in cands:
        c = c if isinstance(c, Candidate) else Candidate(*c)
        if c.method not in METHODS:
            raise ValueError(f"unknown method {c.method!r}; methods: {', '.join(METHODS)}")
        for name, v in (("rank", c.rank), ("clusters", c.clusters)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r} (in {c.key})")
        k = 1 if c.method == "svd" else min(c.clusters, n_adapters) if n_adapters is not None else c.clusters
        c = Candidate(c.method, c.rank, k)
        if c not in out:
            out.append(c)
    if not out:
        raise ValueError("the sweep has no candidates")
    return out


def require_matplotlib() -> None:
    """Raise ImportError naming the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(f"the sweep's plots need matplotlib: {INSTALL_PLOTS}") from err


def sweep(world_dir: str | os.PathLike, configs: Sequence[Candidate | tuple], per_task: int = 4, seed: int = 0,
          out: str | os.PathLike | None = None, console=None, dtype: str | None = None, plots: bool = True) -> dict:
    """Fit, serve and score each candidate bank (`configs`: Candidates or (method, rank, clusters))
    on `per_task` training-split inputs per task; returns sweep.json's content (see the module
    docstring). `out`: default WORLD/sweep; `dtype`: the banks' storage (default: the world's)."""
    world = World.load(world_dir)
    if not world.has_uncompressed():
        raise ValueError(f"{world.path} has no uncompressed adapters ({world.adapters_dir}); the sweep needs a world "
                         "built by `kilolora world build`")
    if per_task < 1:
        raise ValueError(f"per_task must be >= 1, got {per_task}")
    build = world.manifest["build"]
    dtype = dtype if dtype is not None else build.get("bank_dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cands = normalise_candidates(configs, len(world.tasks))
    if plots:
        require_matplotlib()
    out = Path(out) if out is not None else world.path / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".bank-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    t_start = time.perf_counter()

    settings = {"per_task": per_task, "seed": seed, "split": "train", "dtype": dtype,
                "compress_seed": build["seed"], "world_digest": _world_digest(world)}
    fingerprint = _digest(json.dumps({"format": SWEEP_FORMAT, **settings}, sort_keys=True).encode())
    done = _finished_rows(out / "sweep.json", fingerprint, console)
    todo = [c for c in cands if c.key not in done]
    items = task_items(world, data.Encoder(world.tokenizer()), per_task, seed, "train")
    ref = _load_reference(out / "reference.json", fingerprint)

    result = {"format": SWEEP_FORMAT, "world": str(world.path), "out": str(out), "fingerprint": fingerprint,
              "settings": settings, "adapters": len(world.tasks), "items": len(items.gen) + len(items.chk),
              "grid": [c.key for c in cands], "complete": False}
    with _sweep_progress(console) as progress:
        adapters = _load_adapters(world, progress) if todo or ref is None else None
        if todo:
            _validate(adapters, todo, dtype, build["seed"])
        if ref is None:
            ref = _score_reference(world, items, adapters, progress)
            _write_json(out / "reference.json", {"fingerprint": fingerprint, **_dump_reference(ref)})
        result["reference"] = _reference_summary(world, ref, items, per_task)
        rows = {k: {**r, "reused": True} for k, r in done.items()}
        task = progress.add_task("candidates", total=len(cands), completed=len(cands) - len(todo))

        def write(complete: bool) -> None:
            result["rows"] = [rows[c.key] for c in cands if c.key in rows]
            result["rows_outside_grid"] = [r for k, r in rows.items() if k not in result["grid"]]
            result["choice"] = choose(result["rows"])
            result["knee"] = knee(result["rows"])
            result["complete"] = complete
            result["seconds"] = round(time.perf_counter() - t_start, 1)
            _write_json(out / "sweep.json", result)

        write(not todo)
        for c in todo:
            def status(what: str, c=c) -> None:
                progress.update(task, description=f"{c.label}: {what}")

            rows[c.key] = _run_candidate(world, c, adapters, items, ref, dtype, build["seed"], per_task, out, status)
            write(c is todo[-1])
            progress.advance(task)
        progress.update(task, description="done")
    del adapters
    if plots:
        result["plots"] = [str(p) for p in plot(result, out)]
        _write_json(out / "sweep.json", result)
    return result


# ------------------------------------------------------------------------------ one candidate


@dataclass
class _Scored:
    """A variant's results on the items: TaskScores, and its outputs in item order (the text of
    each generation item, then P(yes) of each judgement item)."""

    scores: TaskScores
    outputs: list


class _Recorder:
    """The engine, keeping the texts it generates: `score_tasks` keeps only right / wrong, and the
    sweep also compares each bank's outputs with the uncompressed adapters'."""

    def __init__(self, engine):
        self.engine, self.texts = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, *args, **kw):
        comps = self.engine.generate(*args, **kw)
        self.texts += [c.text for c in comps]
        return comps


def _score(engine, items: TaskItems, adapter_of) -> _Scored:
    rec = _Recorder(engine)
    sc = score_tasks(rec, items, adapter_of)
    return _Scored(sc, rec.texts + [s for _, s, _ in sc.verifier_scores])


def _agreement(a: _Scored, b: _Scored, n_gen: int) -> float:
    """Share of items with the same output: the same text, or a verifier on the same side of 0.5."""
    same = [x == y for x, y in zip(a.outputs[:n_gen], b.outputs[:n_gen])]
    same += [(x > 0.5) == (y > 0.5) for x, y in zip(a.outputs[n_gen:], b.outputs[n_gen:])]
    return sum(same) / len(same) if same else 1.0


def _run_candidate(world: World, c: Candidate, adapters, items: TaskItems, ref: dict[str, _Scored], dtype: str,
                   compress_seed: int, per_task: int, out: Path, status) -> dict:
    from .build import BankConfig, compress_family

    status("compressing")
    t0 = time.perf_counter()
    bank = compress_family(adapters, BankConfig(c.method, c.rank, c.clusters, dtype, compress_seed))
    compress_s = time.perf_counter() - t0
    stats = bank.stats()
    status("scoring")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".bank-", dir=out))
    try:
        bank.save(tmp / "bank")
        del bank
        engine = _bank_engine(world, tmp / "bank")
        got = _score(engine, items, lambda n: n)
        del engine  # ~1000 bank entries and a KV cache: one engine alive at a time
        gc.collect()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    eval_s = time.perf_counter() - t0
    summary = summarize_tasks(world, {"bank": got.scores, "base": ref["base"].scores,
                                      "uncompressed": ref["uncompressed"].scores}, per_task)
    roles = _by_role(world, summary)
    auroc = summary.get("verifier_auroc", {})
    bank_auroc, full_auroc = auroc.get("bank"), auroc.get("uncompressed")
    return {
        "method": c.method, "rank": c.rank, "clusters": c.clusters, "dtype": dtype,
        "params_before": stats["params_before"], "params_after": stats["params_after"],
        "params_saved": stats["params_saved"], "rel_error_mean": stats["rel_error_mean"],
        "rel_error_max": stats["rel_error_max"], "accuracy": summary["accuracy"]["bank"],
        "normalised_score": summary.get("normalised_score"),
        "normalised_task": roles.get("task", {}).get("normalised_score"),
        "normalised_verifier": roles.get("verifier", {}).get("normalised_score"),
        "agreement": _agreement(got, ref["uncompressed"], len(items.gen)),
        "verifier_auroc": bank_auroc, "verifier_auroc_uncompressed": full_auroc,
        "auroc_drop": full_auroc - bank_auroc if bank_auroc is not None and full_auroc is not None else None,
        "cluster_sizes": stats["cluster_sizes"], "fit_iterations_mean": stats["fit_iterations_mean"],
        "fit_iterations_max": stats["fit_iterations_max"], "fit_converged": stats["fit_converged"],
        "compress_s": round(compress_s, 3), "eval_s": round(eval_s, 3), "reused": False,
    }


def _bank_engine(world: World, bank_dir: Path):
    """An engine serving a candidate bank under the task names (svd banks too: one basis per
    adapter, diagonal cores)."""
    return world.engine(bank_dir=bank_dir)


def _by_role(world: World, summary: dict) -> dict[str, dict]:
    """Mean accuracy per role (task / verifier) of each variant, each task weighing the same (as
    in the overall mean), and the role's normalised score."""
    roles = {t["name"]: t["role"] for t in world.tasks}
    out = {}
    for role in sorted(set(roles.values())):
        acc = {v: _mean(a for n, a in per.items() if roles[n] == role) for v, per in summary["per_task"].items()}
        out[role] = {**acc, "count": sum(r == role for r in roles.values())}
        if {"bank", "base", "uncompressed"} <= acc.keys():
            out[role]["normalised_score"] = normalised(acc["bank"], acc["base"], acc["uncompressed"])
    return out


def _validate(adapters, todo: list[Candidate], dtype: str, compress_seed: int) -> None:
    """Refuse a candidate the family cannot take (a rank over a target's size) before any fit runs."""
    from compression.compress import CompressConfig, validate
    from compression.peft_io import Collection

    coll = Collection(adapters)
    for c in todo:
        try:
            validate(coll, CompressConfig(method=c.method, rank=c.rank, clusters=c.clusters, seed=compress_seed,
                                          dtype=dtype))
        except ValueError as e:
            raise ValueError(f"candidate {c.key}: {e}") from None


# -------------------------------------------------------------------------- reference, resume


def _load_adapters(world: World, progress) -> list:
    from compression.peft_io import load_adapter

    task = progress.add_task("loading adapters", total=len(world.tasks))
    out = []
    for t in world.tasks:
        out.append(load_adapter(world.adapters_dir / t["name"], name=t["name"]))
        progress.advance(task)
    return out


def _score_reference(world: World, items: TaskItems, adapters, progress) -> dict[str, _Scored]:
    """The base's and the uncompressed adapters' results, on one engine (the adapters as `full/<task>`)."""
    task = progress.add_task("base, uncompressed", total=2)
    engine = world.engine(bank=False)
    for a in adapters:
        engine.add_adapter("full/" + a.name, a)
    ref = {}
    for name, adapter_of in (("base", lambda n: None), ("uncompressed", lambda n: "full/" + n)):
        ref[name] = _score(engine, items, adapter_of)
        progress.advance(task)
    del engine
    gc.collect()
    return ref


def _reference_summary(world: World, ref: dict[str, _Scored], items: TaskItems, per_task: int) -> dict:
    """sweep.json's view of the reference: accuracy, per role, verifier AUROC, and how often the
    base already gives the uncompressed adapters' output (1.0 would make agreement vacuous)."""
    parts = [summarize_tasks(world, {k: v.scores}, per_task) for k, v in ref.items()]  # one at a time: no bank yet
    s = {key: {k: v for p in parts for k, v in p.get(key, {}).items()} for key in ("accuracy", "per_task",
                                                                                  "verifier_auroc")}
    return {"accuracy": s["accuracy"], "by_role": _by_role(world, s), "verifier_auroc": s["verifier_auroc"],
            "base_agreement": _agreement(ref["base"], ref["uncompressed"], len(items.gen))}


def _dump_reference(ref: dict[str, _Scored]) -> dict:
    return {k: {"correct": v.scores.correct, "verifier_scores": v.scores.verifier_scores, "outputs": v.outputs}
            for k, v in ref.items()}


def _load_reference(path: Path, fingerprint: str) -> dict[str, _Scored] | None:
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    if d.get("fingerprint") != fingerprint:
        return None
    return {k: _Scored(TaskScores(d[k]["correct"], [tuple(x) for x in d[k]["verifier_scores"]]), d[k]["outputs"])
            for k in ("base", "uncompressed")}


def _finished_rows(path: Path, fingerprint: str, console) -> dict[str, dict]:
    """The rows of an earlier run with the same fingerprint, by candidate key; an earlier run with
    other settings is moved to sweep.prev.json (and nothing is reused)."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if old.get("fingerprint") != fingerprint:
        os.replace(path, path.with_name("sweep.prev.json"))
        if console is not None:
            console.print(f"[dim]{path} was swept with other settings or another world: starting afresh "
                          "(the old one is in sweep.prev.json)[/dim]")
        return {}
    rows = old.get("rows", []) + old.get("rows_outside_grid", [])
    if rows and console is not None:
        console.print(f"[dim]resuming {path}: {len(rows)} candidate(s) already done[/dim]")
    return {Candidate(r["method"], r["rank"], r["clusters"]).key: r for r in rows}


def _world_digest(world: World) -> str:
    """sha256 over what the sweep's numbers depend on: the base model and tokenizer, the task
    list and every uncompressed adapter (not the world's own bank, which the sweep replaces)."""
    h = hashlib.sha256(json.dumps(world.tasks, sort_keys=True).encode())
    files = [world.base_dir / f for f in ("config.json", "model.safetensors", "tokenizer.json")]
    files += [world.adapters_dir / t["name"] / f for t in world.tasks
              for f in ("adapter_config.json", "adapter_model.safetensors")]
    for f in files:
        h.update(f.relative_to(world.path).as_posix().encode())
        if f.is_file():
            with open(f, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def _digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class _NoProgress:
    """rich's Progress, doing nothing (no console given)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, *args, **kw) -> int:
        return 0

    def update(self, *args, **kw) -> None:
        pass

    def advance(self, *args, **kw) -> None:
        pass


def _sweep_progress(console):
    if console is None:
        return _NoProgress()
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("sweep: {task.description:<30}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=console)


# ---------------------------------------------------------------------------- choice and knee


def choose(rows: Sequence[dict], min_saved: float = 0.95, min_normalised: float = 0.95,
           max_auroc_drop: float = 0.02) -> dict | None:
    """The bank to ship: among the rows that save ≥ `min_saved` of the parameters, keep a
    normalised score ≥ `min_normalised` and lose ≤ `max_auroc_drop` verifier AUROC, the one with
    the highest normalised score (ties: more saved). If none meets them all, the row with the
    highest normalised score among those saving ≥ `min_saved` (or, if none does, the row saving
    the most), with `meets_targets: False` and the targets it misses. None for no rows."""
    if not rows:
        return None
    targets = {"min_saved": min_saved, "min_normalised": min_normalised, "max_auroc_drop": max_auroc_drop}

    def misses(r: dict) -> list[str]:
        out = []
        if r["params_saved"] < min_saved:
            out.append(f"params saved {r['params_saved']:.3f} < {min_saved}")
        ns = r.get("normalised_score")
        if ns is None:
            out.append("no normalised score (the uncompressed adapters do not beat the base)")
        elif ns < min_normalised:
            out.append(f"normalised score {ns:.3f} < {min_normalised}")
        drop = r.get("auroc_drop")
        if drop is not None and drop > max_auroc_drop:
            out.append(f"verifier AUROC drop {drop:.3f} > {max_auroc_drop}")
        return out

    def best(idx: list[int]) -> int:
        return max(idx, key=lambda i: (_or_inf(rows[i].get("normalised_score")), rows[i]["params_saved"],
                                       -rows[i]["rel_error_mean"]))

    meeting = [i for i, r in enumerate(rows) if not misses(r)]
    small = [i for i, r in enumerate(rows) if r["params_saved"] >= min_saved]
    if meeting:
        i = best(meeting)
        reason = (f"highest normalised score among the {len(meeting)} of {len(rows)} candidates meeting every target"
                  + ("" if rows[i].get("auroc_drop") is not None else " (no verifier AUROC to compare)"))
    elif small:
        i = best(small)
        reason = (f"no candidate meets every target; the highest normalised score among the {len(small)} saving "
                  f">= {min_saved} of the parameters, which misses: {'; '.join(misses(rows[i]))}")
    else:
        i = max(range(len(rows)), key=lambda j: (rows[j]["params_saved"], _or_inf(rows[j].get("normalised_score"))))
        reason = (f"no candidate saves >= {min_saved} of the parameters; the one saving the most, which misses: "
                  f"{'; '.join(misses(rows[i]))}")
    r = rows[i]
    return {"index": i, "method": r["method"], "rank": r["rank"], "clusters": r["clusters"],
            "meets_targets": bool(meeting), "misses": misses(r), "reason": reason, "targets": targets,
            "candidates_meeting": len(meeting), "params_saved": r["params_saved"],
            "normalised_score": r.get("normalised_score"), "auroc_drop": r.get("auroc_drop")}


def knee(rows: Sequence[dict], threshold: float = 0.95) -> dict:
    """Where quality falls with reconstruction error: the rows of every method pooled and sorted
    by mean relative error, `max_error_ok` is the largest error up to which every row keeps a
    normalised score ≥ `threshold`, `first_error_below` the error of the first row below it
    (None: none falls below / the first already does). `passing_beyond` counts rows above
    `first_error_below` that pass anyway: error alone does not decide quality when it is > 0."""
    pts = sorted(((r["rel_error_mean"], r["normalised_score"]) for r in rows if r.get("normalised_score") is not None),
                 key=lambda p: (p[0], p[1]))  # at equal error a failing row comes first: that error is not safe
    ok, below = None, None
    for e, s in pts:
        if s < threshold:
            below = e
            break
        ok = e
    beyond = sum(1 for e, s in pts if below is not None and e > below and s >= threshold)
    if not pts:
        summary = "no candidate has a normalised score (the uncompressed adapters do not beat the base)"
    elif below is None:
        summary = f"every candidate keeps >= {threshold} (mean rel. error up to {ok:.4g})"
    elif ok is None:
        summary = f"already below {threshold} at the lowest mean rel. error, {below:.4g}"
    else:
        summary = f"normalised score >= {threshold} up to mean rel. error {ok:.4g}; first below at {below:.4g}"
    return {"threshold": threshold, "max_error_ok": ok, "first_error_below": below, "passing_beyond": beyond,
            "rows": len(pts), "rows_without_score": len(rows) - len(pts), "summary": summary}


def _or_inf(x: float | None) -> float:
    return -math.inf if x is None else x


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else 0.0


# ------------------------------------------------------------------------------------ plots

COLORS = {"svd": "#7f7f7f", "jd-diag": "#1f77b4", "jd-full": "#d62728"}
MARKERS = {"svd": "s", "jd-diag": "o", "jd-full": "^"}


def plot(result: dict, out: str | os.PathLike) -> list[Path]:
    """Draw sweep_saved.png and sweep_error.png of a sweep's result into `out`; their paths."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    out = Path(out)
    rows = result.get("rows", [])
    scored = [r for r in rows if r.get("normalised_score") is not None]
    note = (f"{len(rows) - len(scored)} of {len(rows)} candidates have no normalised score "
            "(the uncompressed adapters do not beat the base)") if len(scored) < len(rows) else None
    paths = []
    for name, draw in zip(PLOTS, (_draw_saved, _draw_error)):
        fig = Figure(figsize=(7.5, 4.8), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        draw(ax, result, scored)
        if note:
            ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=8, color="0.35", va="bottom")
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        paths.append(out / name)
    return paths


def _title(result: dict, what: str) -> str:
    return f"{what}\n{result.get('adapters', '?')} adapters, training-split inputs ({result.get('items', '?')} items)"


def _draw_saved(ax, result: dict, rows: list[dict]) -> None:
    choice = result.get("choice") or {}
    t = choice.get("targets", {"min_saved": 0.95, "min_normalised": 0.95, "max_auroc_drop": 0.02})
    # x: the share of parameters kept, on a log axis reversed so that saving more goes right: the
    # candidates worth shipping crowd into 90-99.9% saved, which a linear axis squeezes together
    drop_ok = lambda r: r.get("auroc_drop") is None or r["auroc_drop"] <= t["max_auroc_drop"]  # noqa: E731
    for m in METHODS:
        pts = sorted((_kept(r), r["normalised_score"]) for r in rows if r["method"] == m)
        if not pts:
            continue
        ok = [(_kept(r), r["normalised_score"]) for r in rows if r["method"] == m and drop_ok(r)]
        bad = [(_kept(r), r["normalised_score"]) for r in rows if r["method"] == m and not drop_ok(r)]
        ax.scatter(*zip(*ok) if ok else ([], []), color=COLORS[m], marker=MARKERS[m], s=28, alpha=0.8, label=m)
        if bad:
            ax.scatter(*zip(*bad), facecolors="none", edgecolors=COLORS[m], marker=MARKERS[m], s=28)
        front = [p for p in pts if all(q[1] < p[1] for q in pts if q[0] < p[0])]
        ax.plot(*zip(*front), color=COLORS[m], lw=1.2, alpha=0.7)  # its frontier: best score at this saving or more
    ax.set_xscale("log")
    kept = [_kept(r) for r in result.get("rows", [])] + [1 - t["min_saved"]]
    hi, lo = max(kept) * 1.4, min(kept) / 1.4
    ax.set_xlim(hi, lo)  # reversed
    ticks = [k for k in (4, 2, 1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001) if lo <= k <= hi]
    ax.set_xticks(ticks, [f"{100 * (1 - k):g}%" for k in ticks])
    ax.minorticks_off()
    ax.axvline(1 - t["min_saved"], color="green", ls="--", lw=1)
    ax.axhline(t["min_normalised"], color="green", ls="--", lw=1,
               label=f"targets: saved >= {100 * t['min_saved']:.0f}%, score >= {t['min_normalised']}")
    if any(not drop_ok(r) for r in rows):
        ax.scatter([], [], facecolors="none", edgecolors="0.3", marker="o", s=28,
                   label=f"hollow: verifier AUROC drop > {t['max_auroc_drop']}")
    all_rows = result.get("rows", [])
    if choice and choice["index"] < len(all_rows) and all_rows[choice["index"]].get("normalised_score") is not None:
        r = all_rows[choice["index"]]
        x, y = _kept(r), r["normalised_score"]
        ok = choice["meets_targets"]
        ax.scatter([x], [y], s=220, facecolors="none", edgecolors="black", linewidths=1.6, zorder=5,
                   label="chosen" if ok else "chosen (misses targets)")
        ax.annotate(Candidate(r["method"], r["rank"], r["clusters"]).label, (x, y), xytext=(-12, -14),
                    textcoords="offset points", ha="left", fontsize=8)
    ax.set_xlabel("parameters saved vs the uncompressed adapters (log scale of the share kept)")
    ax.set_ylabel("normalised score\n(bank − base) / (uncompressed − base)")
    ax.set_title(_title(result, "Bank sweep: quality kept vs parameters saved"), fontsize=10)


def _kept(r: dict) -> float:
    return max(1 - r["params_saved"], 1e-6)


def _draw_error(ax, result: dict, rows: list[dict]) -> None:
    k = result.get("knee") or knee(rows)
    for m in METHODS:
        pts = [(r["rel_error_mean"], r["normalised_score"]) for r in rows if r["method"] == m]
        if pts:
            ax.scatter(*zip(*pts), color=COLORS[m], marker=MARKERS[m], s=28, alpha=0.8, label=m)
    ax.axhline(k["threshold"], color="green", ls="--", lw=1, label=f"score {k['threshold']}")
    if k["max_error_ok"] is not None:
        ax.axvline(k["max_error_ok"], color="black", ls=":", lw=1.2,
                   label=f"knee: >= {k['threshold']} up to error {k['max_error_ok']:.3g}")
    if k["max_error_ok"] is not None and k["first_error_below"] is not None:
        ax.axvspan(k["max_error_ok"], k["first_error_below"], color="orange", alpha=0.2,
                   label=f"falls below by error {k['first_error_below']:.3g}")
    ax.set_xlabel("mean relative reconstruction error ‖ΔW − ΔŴ‖ / ‖ΔW‖ (over adapters)")
    ax.set_ylabel("normalised score\n(bank − base) / (uncompressed − base)")
    ax.set_title(_title(result, "Bank sweep: quality vs reconstruction error (all methods)"), fontsize=10)
