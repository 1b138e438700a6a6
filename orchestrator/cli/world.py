"""`kilolora world build`, `world rebank` and `world eval`: rebuild, recompress and measure a world.

`skills` (and so torch) is imported inside the commands: `kilolora --help` stays fast.
"""

from __future__ import annotations

import json as jsonlib
import sys
import time

from rich.console import Console
from rich.table import Table

err_console = Console(stderr=True)


def world_build(*, out: str = "kilolora-world", seed: int = 0, quick: bool = False, overwrite: bool = False,
                no_eval: bool = False, reuse_base: str | None = None, from_stage: str | None = None,
                checkpoint_every: int = 100) -> None:
    """Train the default world from scratch: tokenizer, base model, skills, task family, bank.

    Stages: pretrain a small Llama on arithmetic solutions (with and without calculator blocks)
    and instructed string transformations; sample the base's own solutions and label them; train
    the verifier, self-evaluation, tool selector and the 1014 rank-16 adapters of the family
    (task adapters and per-task verifiers) together in one batch through the serving layers;
    export them as PEFT adapters; compress the family into one bank; evaluate. The full build
    takes about 2 hours on 2 CPU cores (base ~44 min, adapters ~74 min; see README); --quick
    builds a micro world in seconds (for tests). The world is written atomically.

    Resumable: the stages (base, sampling, adapters, export, eval) work in .OUT.build/ beside
    OUT and keep what they finished, and the adapter stage checkpoints itself; run the same
    command again after an interruption and it goes on where it stopped. --from STAGE redoes a
    stage and every later one.

    To refresh the embedded copy: kilolora world build --out skills/default_world --overwrite

    Args:
      out: output directory (the uncompressed task adapters go to OUT/adapters)
      seed: seed of all data, initialisation and sampling
      quick: tiny sizes, every stage, seconds
      overwrite: replace OUT if it exists
      no_eval: skip the evaluation recorded in world.json
      reuse_base: take the base model from this checkpoint directory (a previous build's base/,
        same seed and sizes) instead of pretraining it again (recorded in world.json)
      from_stage: redo this stage and the later ones (base, sampling, adapters, export, eval)
      checkpoint_every: adapter-training steps between checkpoints
    """
    from skills.build import BuildConfig, build

    cfg = BuildConfig.quick(seed) if quick else BuildConfig(seed=seed)
    t0 = time.perf_counter()
    if checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {checkpoint_every}")
    world = build(out, cfg, overwrite=overwrite, console=err_console, evaluate_after=not no_eval,
                  reuse_base=reuse_base, from_stage=from_stage, checkpoint_every=checkpoint_every)
    err_console.print(f"built {world.path} in {time.perf_counter() - t0:.0f} s "
                      f"({len(world.tasks)} task adapters in the bank, {len(world.skills()) - len(world.tasks)} skills)")
    if "eval" in world.manifest:
        _print_report(world.manifest["eval"])


def world_rebank(*, world: str = "kilolora-world", method: str | None = None, rank: int | None = None,
                 clusters: int | None = None, dtype: str | None = None, no_eval: bool = False) -> None:
    """Recompress a built world's task family into a new bank, without retraining anything.

    Reads the uncompressed task adapters in WORLD/adapters (written by `world build`), fits a new
    bank with the given settings (the others keep the world's current ones), replaces WORLD/bank
    and records the settings and a fresh evaluation in world.json. Seconds to a few minutes.

    Example: kilolora world rebank --world kilolora-world --method jd-diag --rank 48 --clusters 20

    Args:
      world: a world directory built by `kilolora world build` (with its adapters/)
      method: jd-full | jd-diag | svd (see `kilolora compress --help`)
      rank: rank of the shared bases
      clusters: number of clusters
      dtype: float32 | float16 | bfloat16
      no_eval: skip the evaluation
    """
    from skills.build import BankConfig, rebank
    from skills.world import World

    for name, v in (("rank", rank), ("clusters", clusters)):
        if v is not None and v < 1:
            raise ValueError(f"--{name} must be >= 1, got {v}")
    b = World.load(world).manifest["build"]
    cfg = BankConfig(method=method or b["bank_method"], rank=rank or b["bank_rank"],
                     clusters=clusters or b["bank_clusters"], dtype=dtype or b.get("bank_dtype", "float32"),
                     seed=b["seed"])
    t0 = time.perf_counter()
    w = rebank(world, cfg, console=err_console, evaluate_after=not no_eval)
    err_console.print(f"rebanked {w.path} in {time.perf_counter() - t0:.0f} s ({cfg.method}, rank {cfg.rank}, "
                      f"{cfg.clusters} clusters, {cfg.dtype})")
    if "eval" in w.manifest:
        _print_report(w.manifest["eval"])


def world_retrain(*, world: str = "kilolora-world", skills: str = "verifier,self_eval", steps: int = 500,
                  batch: int = 48, no_eval: bool = False) -> None:
    """Retrain a built world's verifier and/or step checker in place, keeping everything else.

    The skills learn from the base model's own sampled solutions (drawn exactly as the build
    draws them) and from right/wrong twins, reading the calculator's check of the claims after
    their invocation. The old adapters are replaced only once the new ones are saved; world.json
    records the run and a fresh evaluation. About 10 minutes on 2 CPU cores with the defaults (then ~1 min of evaluation).

    Args:
      world: a world directory (e.g. skills/default_world)
      skills: comma-separated: verifier, self_eval
      steps: optimizer steps
      batch: examples per step (split evenly between the skills)
      no_eval: skip the evaluation
    """
    from skills.build import retrain_skills

    names = tuple(x.strip() for x in skills.split(",") if x.strip())
    t0 = time.perf_counter()
    w = retrain_skills(world, names, steps=steps, batch=batch, console=err_console, evaluate_after=not no_eval)
    err_console.print(f"retrained {', '.join(names)} in {w.path} in {time.perf_counter() - t0:.0f} s")
    if "eval" in w.manifest:
        _print_report(w.manifest["eval"])


def world_sweep(*, world: str = "kilolora-world", methods: str = "svd,jd-diag,jd-full", ranks: str = "8,16,32",
                clusters: str = "1,4,8", grid: str | None = None, per_task: int = 4, seed: int = 0,
                dtype: str | None = None, out: str | None = None) -> None:
    """Sweep compression methods, ranks and cluster counts over a world's task family and choose the bank.

    Each candidate bank is fitted to the uncompressed task adapters in WORLD/adapters, served by
    the engine and scored on TRAINING-split inputs (the held-out split stays for `world eval`),
    against the base and the uncompressed adapters (scored once). The choice: among candidates
    saving >= 95% of the parameters with normalised score (bank - base) / (uncompressed - base)
    >= 0.95 and verifier AUROC within 0.02 of the uncompressed, the highest normalised score; if
    none meets all three, the best one saving >= 95%, marked as missing the targets. Also reports
    the knee: the mean reconstruction error up to which the normalised score stays >= 0.95.

    Writes OUT/sweep.json (after every candidate: an interrupted or extended sweep reruns only
    what is missing), OUT/sweep_saved.png and OUT/sweep_error.png. Apply the choice with
    `kilolora world rebank`.

    Example: kilolora world sweep --world kilolora-world --grid svd:16,jd-diag:32:8,jd-full:16:8

    Args:
      world: a world directory built by `kilolora world build` (with its adapters/)
      methods: comma-separated: svd, jd-diag, jd-full
      ranks: comma-separated ranks of the shared bases
      clusters: comma-separated cluster counts (svd has none: it runs once per rank)
      grid: explicit candidates method:rank:clusters,... instead of the product of the three above
      per_task: training-split inputs per task adapter
      seed: seed of the inputs drawn
      dtype: float32 | float16 | bfloat16 storage of the banks (default: the world's bank dtype)
      out: output directory (default: WORLD/sweep)
    """
    from skills import sweep as S

    if grid is not None:
        cands = S.parse_grid(grid)
    else:
        cands = S.candidates(_names(methods), _ints(ranks, "ranks"), _ints(clusters, "clusters"))
    if per_task < 1:
        raise ValueError(f"--per-task must be >= 1, got {per_task}")
    try:
        S.require_matplotlib()
    except ImportError as e:  # an install step, not a bug: one line, not a traceback
        raise ValueError(str(e)) from None
    t0 = time.perf_counter()
    r = S.sweep(world, cands, per_task=per_task, seed=seed, out=out, console=err_console, dtype=dtype)
    err_console.print(f"swept {len(r['rows'])} candidate banks of {r['adapters']} adapters in "
                      f"{time.perf_counter() - t0:.0f} s ({sum(x['reused'] for x in r['rows'])} reused)")
    _print_sweep(r)


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in _names(text)]
    except ValueError:
        raise ValueError(f"--{what} must be comma-separated integers, got {text!r}") from None


def _print_sweep(r: dict) -> None:
    out = Console()
    choice = r.get("choice")
    t = Table(title=f"bank sweep: {r['adapters']} adapters, training-split inputs", show_header=True)
    for col in ("bank", "saved", "err mean", "err max", "acc", "norm.", "AUROC drop"):
        t.add_column(col, justify="left" if col == "bank" else "right")
    rows = sorted(enumerate(r["rows"]), key=lambda ir: ir[1]["params_saved"])
    for i, x in rows:
        star = " *" if choice is not None and choice.get("index") == i else ""
        label = f"{x['method']} r{x['rank']}" + (f" k{x['clusters']}" if x["method"] != "svd" else "") + star
        t.add_row(label, _fmt(x["params_saved"]), _fmt(x["rel_error_mean"]), _fmt(x["rel_error_max"]),
                  _fmt(x["accuracy"]), _fmt(x.get("normalised_score")), _fmt(x.get("auroc_drop")),
                  style="dim" if x.get("reused") else None)
    out.print(t)
    if choice is not None:
        out.print(f"choice (*): {choice['method']} rank {choice['rank']}, {choice['clusters']} clusters: "
                  f"{choice['reason']}")
        out.print(f"  apply it: kilolora world rebank --world WORLD --method {choice['method']} --rank "
                  f"{choice['rank']} --clusters {choice['clusters']}")
    out.print(f"knee: {r['knee']['summary']}")
    for p in r.get("plots", []):
        out.print(f"plot: {p}")


def world_eval(*, world: str | None = None, json: bool = False, problems: int = 200, per_task: int = 8,
               samples: int = 4, max_tasks: int | None = None, seed: int = 0) -> None:
    """Measure a world on its held-out splits, served by the engine.

    Reports base greedy accuracy (and pass@k, majority@k, verifier best-of-k over k samples),
    verifier AUROC, self-evaluation AUROC on steps, tool-selector precision/recall, per-task
    accuracy of the task adapters uncompressed vs from the bank vs base, the bank's size and
    reconstruction error, and the normalised score (bank - base) / (uncompressed - base).
    Uncompressed adapters are measured when WORLD/adapters exists (after a build); the embedded
    world ships only the bank, so its uncompressed figures come from world.json (recorded at build).

    Args:
      world: world directory (default: the embedded world)
      json: print the report as JSON on stdout
      problems: held-out arithmetic problems
      per_task: held-out inputs per task adapter
      samples: sampled solutions per problem (verifier / self-eval data)
      max_tasks: evaluate only the first N task adapters
      seed: seed of the held-out sample
    """
    from skills.evaluate import evaluate
    from skills.world import World

    for name, v in (("problems", problems), ("per_task", per_task), ("samples", samples)):
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    w = World.load(world)
    t0 = time.perf_counter()
    report = evaluate(w, n_problems=problems, per_task=per_task, samples=samples, seed=seed, max_tasks=max_tasks,
                      console=err_console)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    recorded = w.manifest.get("eval", {}).get("tasks", {})
    if report["tasks"]["uncompressed_source"] != "live" and "uncompressed" in recorded.get("accuracy", {}):
        report["tasks"]["recorded_at_build"] = {k: recorded[k] for k in ("accuracy", "normalised_score", "bank_over_uncompressed",
                                                                          "verifier_auroc", "by_group") if k in recorded}
    if json:
        sys.stdout.write(jsonlib.dumps(report, indent=1) + "\n")
    else:
        _print_report(report)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def _print_report(r: dict) -> None:
    out = Console()
    k = r.get("samples_per_problem", 4)
    t = Table(title="world eval (held-out)", show_header=True)
    t.add_column("measure")
    t.add_column("value", justify="right")
    rows = [("base greedy accuracy", r["base_greedy_accuracy"]),
            ("  asked in words, after a system prompt and a turn", r.get("base_greedy_accuracy_in_chat")), (f"pass@{k} (samples, T=1)", r.get(f"pass_at_{k}")),
            (f"majority of {k}", r.get(f"majority_of_{k}")), (f"verifier best of {k}", r.get(f"verifier_best_of_{k}")),
            ("verifier AUROC", r["verifier_auroc"]),
            ("verifier AUROC within a problem", r.get("verifier_auroc_within_problem")),
            ("self-eval AUROC (steps)", r["self_eval_auroc"]),
            ("tool selector precision", r["tool_selector_precision"]),
            ("tool selector recall", r["tool_selector_recall"])]
    tasks = r["tasks"]
    acc = tasks["accuracy"]
    rec = tasks.get("recorded_at_build", {})
    unc = acc.get("uncompressed", rec.get("accuracy", {}).get("uncompressed"))
    src = "" if "uncompressed" in acc else " (recorded at build)"
    rows += [(f"task adapters ({tasks['count']}): base", acc["base"]), ("task adapters: uncompressed" + src, unc),
             ("task adapters: bank", acc["bank"]),
             ("normalised score" + src, tasks.get("normalised_score", rec.get("normalised_score")))]
    for g, d in tasks.get("by_group", {}).items():
        parts = [f"{v} {d[v]:.3f}" for v in ("base", "uncompressed", "bank") if v in d]
        if d.get("normalised_score") is not None:
            parts.append(f"normalised {d['normalised_score']:.3f}")
        rows.append((f"  {g} ({d['count']})", ", ".join(parts)))
    ver = tasks.get("verifier_auroc")
    if ver:
        rows.append(("per-task verifiers AUROC", ", ".join(f"{v} {x:.3f}" for v, x in ver.items() if x is not None)))
    b = r["bank"]
    rows += [("bank params saved", b["params_saved"]), ("bank mean rel. error", b["rel_error_mean"]),
             ("bank", f"{b['method']} rank {b['rank']}, {b['clusters']} clusters, {b['params_after']:,} params")]
    for name, v in rows:
        t.add_row(name, _fmt(v))
    out.print(t)
