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
    the verifier, self-evaluation, tool selector and 325 task adapters together in one batch
    through the serving layers; export them as PEFT adapters; compress the task family into one
    bank; evaluate. The full build takes about an hour on 2 CPU cores (see README);
    --quick builds a micro world in seconds (for tests). The world is written atomically.

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
        report["tasks"]["recorded_at_build"] = {k: recorded[k] for k in ("accuracy", "normalised_score",
                                                                          "bank_over_uncompressed") if k in recorded}
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
    rows = [("base greedy accuracy", r["base_greedy_accuracy"]), (f"pass@{k} (samples, T=1)", r.get(f"pass_at_{k}")),
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
    b = r["bank"]
    rows += [("bank params saved", b["params_saved"]), ("bank mean rel. error", b["rel_error_mean"]),
             ("bank", f"{b['method']} rank {b['rank']}, {b['clusters']} clusters, {b['params_after']:,} params")]
    for name, v in rows:
        t.add_row(name, _fmt(v))
    out.print(t)
