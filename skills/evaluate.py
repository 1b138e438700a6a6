"""`kilolora world eval`: measure a world's base model and skills on held-out splits, served by
the engine exactly as the orchestrator uses them.

- base greedy accuracy on held-out arithmetic problems (and pass@k / majority / verifier-best-of-k
  on k samples, to show the headroom test-time strategies have);
- verifier AUROC on the base's own held-out samples (correct vs incorrect final answer);
- self-evaluation AUROC on the steps of those samples (first-error labelling);
- tool-selector precision / recall of calls at held-out step boundaries (a call counts when its
  expression is exactly the next product);
- per task of the family: accuracy of the uncompressed adapter, of its bank entry and of the base
  (no adapter); the bank's size and reconstruction error; the normalised score
  (bank − base) / (uncompressed − base) of the mean accuracies.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Sequence

from . import data
from .spec import yes_probability
from .tasks import CALC_CLOSE, CALC_OPEN, Transform, parse_answer, problems
from .tokenizer import CHECK, NO, SELECT, VERIFY, YES
from .world import World


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U; ties count half). None if one class is empty."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    ranked = sorted((s, i) for i, s in enumerate(list(pos) + list(neg)))
    ranks = [0.0] * len(ranked)
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[ranked[k][1]] = (i + j) / 2 + 1
        i = j + 1
    u = sum(ranks[: len(pos)]) - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def yes_no_scores(engine, contexts: Sequence[list[int]], invocation: str | Sequence[str], adapters: Sequence[str | None],
                  yes: str = YES, no: str = NO, chunk: int = 128) -> list[float]:
    """P(yes) after `context + invocation` (one string, or one per context: invocation and
    evidence) under each adapter, via the engine's scoring."""
    invs = [invocation] * len(contexts) if isinstance(invocation, str) else list(invocation)
    out = []
    for i in range(0, len(contexts), chunk):
        seqs = [engine.open(c) for c in contexts[i:i + chunk]]
        try:
            items = []
            for s, a, inv in zip(seqs, adapters[i:i + chunk], invs[i:i + chunk]):
                items += [(s, inv + yes, a), (s, inv + no, a)]
            res = engine.score_many(items)
        finally:
            for s in seqs:
                engine.close(s)
        out += [yes_probability(res[2 * j][0][-1], res[2 * j + 1][0][-1]) for j in range(len(seqs))]
    return out


def _generate(engine, prompts, adapters, max_tokens, temperature=0.0, seed=0, stop_token_ids=(), chunk=256):
    from serving.sampling import SamplingParams

    out = []
    for i in range(0, len(prompts), chunk):
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i + j,
                                 stop_token_ids=list(stop_token_ids)) for j in range(len(prompts[i:i + chunk]))]
        out += engine.generate(prompts[i:i + chunk], adapter=list(adapters[i:i + chunk]), params=params)
    return out


def evaluate(world: World, n_problems: int = 200, per_task: int = 8, samples: int = 4, seed: int = 0,
             max_tasks: int | None = None, uncompressed: bool | None = None, console=None) -> dict:
    """The report (a JSON-able dict); see the module docstring. `uncompressed`: measure the
    original task adapters too (default: when the world has them)."""
    from compression.bank import Bank

    has_full = world.has_uncompressed() if uncompressed is None else uncompressed
    stage = _Stages(console, 6)
    stage("loading the world")
    engine = world.engine(uncompressed=has_full, kv_cache_tokens=1 << 17)
    tok = engine.tokenizer
    enc = data.Encoder(tok)
    report: dict = {"held_out_problems": n_problems, "samples_per_problem": samples}

    stage("base: greedy and sampled solutions")
    probs = problems(n_problems, seed + 101, "test")
    prompts = [enc.prompt(p.question) for p in probs]
    greedy = _generate(engine, prompts, [None] * len(probs), 72)
    report["base_greedy_accuracy"] = _mean(parse_answer(c.text) == p.answer for p, c in zip(probs, greedy))
    jobs = [(p, j) for p in probs for j in range(samples)]
    comps = _generate(engine, [enc.prompt(p.question) for p, _ in jobs], [None] * len(jobs), 72, temperature=1.0,
                      seed=seed * 7919 + 5)
    smp = [data.Sample(p, c.text, c.finish_reason == "stop") for (p, _), c in zip(jobs, comps)]

    stage("verifier")
    vscores = yes_no_scores(engine, [data.verifier_context(enc, s.problem, s.text) for s in smp],
                            [_suffix(world, "verifier", VERIFY, s.text) for s in smp], ["verifier"] * len(smp))
    labels = [s.correct for s in smp]
    report["sample_accuracy"] = _mean(labels)
    report["verifier_auroc"] = auroc(vscores, labels)
    by_problem = collections.defaultdict(list)
    for s, v in zip(smp, vscores):
        by_problem[s.problem.question].append((v, s))
    report[f"pass_at_{samples}"] = _mean(any(s.correct for _, s in g) for g in by_problem.values())
    report[f"majority_of_{samples}"] = _mean(_majority(g) for g in by_problem.values())
    report[f"verifier_best_of_{samples}"] = _mean(max(g, key=lambda x: x[0])[1].correct for g in by_problem.values())
    # within one problem: does the verifier rank its right samples above its wrong ones? (overall
    # AUROC also rewards knowing which problems are hard, which best-of-n cannot use)
    mixed = [g for g in by_problem.values() if 0 < sum(s.correct for _, s in g) < len(g)]
    report["verifier_auroc_within_problem"] = _mean(auroc([v for v, _ in g], [s.correct for _, s in g])
                                                    for g in mixed) if mixed else None
    report["verifier_mixed_problems"] = len(mixed)

    stage("self-evaluation (steps)")
    step_items = [(s, k, ok) for s in smp for k, ok in s.step_labels()]
    ctx = [data.self_eval_context(enc, s.problem, data.split_steps(s.text)[: k + 1]) for s, k, _ in step_items]
    suffixes = [_suffix(world, "self_eval", CHECK, " ".join(data.split_steps(s.text)[: k + 1]))
                for s, k, _ in step_items]
    sscores = yes_no_scores(engine, ctx, suffixes, ["self_eval"] * len(ctx))
    report["self_eval_auroc"] = auroc(sscores, [ok for _, _, ok in step_items])
    report["self_eval_steps"] = len(step_items)

    stage("tool selector")
    sel_items = [(p, done, step) for p in probs for tool in (True, False) for done, step in p.prefixes(tool)]
    sel_prompts = [data.selector_context(enc, p, done) + enc.ids(SELECT) for p, done, _ in sel_items]
    close_id = tok.convert_tokens_to_ids(CALC_CLOSE)
    sel = _generate(engine, sel_prompts, ["tool_selector"] * len(sel_items), 24, stop_token_ids=[close_id])
    tp = fp = fn = 0
    for (p, done, step), c in zip(sel_items, sel):
        text = tok.decode(c.token_ids, skip_special_tokens=False)
        proposed = text.startswith(CALC_OPEN)
        want = data.selector_target(step) != tok.eos_token
        expr = text[len(CALC_OPEN):].split(CALC_CLOSE)[0].strip() if proposed else None
        if proposed and want and expr == step.expr:
            tp += 1
        else:
            fp += proposed
            fn += want
    report["tool_selector_precision"] = tp / (tp + fp) if tp + fp else None
    report["tool_selector_recall"] = tp / (tp + fn) if tp + fn else None
    report["tool_selector_boundaries"] = len(sel_items)

    stage(f"task adapters ({'bank, uncompressed, base' if has_full else 'bank, base'})")
    report["tasks"] = _eval_tasks(engine, enc, world, per_task, seed, has_full, max_tasks)
    stats = Bank.load(world.bank_dir).stats()
    report["bank"] = {k: stats[k] for k in ("method", "adapters", "rank", "clusters", "params_before", "params_after",
                                            "params_saved", "rel_error_mean", "rel_error_max")}
    stage.done()
    return report


def _suffix(world: World, skill: str, invocation: str, text: str) -> str:
    """The invocation, and the calculator's check of `text` if the skill reads one."""
    ev = world.skill(skill).evidence
    return invocation + (data.evidence(data.calc_checks(text)) if ev == "calculator" else "")


class _Stages:
    """A progress bar over the evaluation's stages (on `console`, if one is given)."""

    def __init__(self, console, total: int):
        self.progress = None
        if console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("eval: {task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=console)
            self.progress.start()
            self.task = self.progress.add_task("", total=total)
        self.started = False

    def __call__(self, desc: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=desc, advance=1 if self.started else 0)
        self.started = True

    def done(self) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description="done")
            self.progress.stop()


def _eval_tasks(engine, enc, world: World, per_task: int, seed: int, has_full: bool, max_tasks: int | None) -> dict:
    tasks = world.tasks if max_tasks is None else world.tasks[:max_tasks]
    variants = {"bank": lambda n: n, "base": lambda n: None}
    if has_full:
        variants["uncompressed"] = lambda n: "full/" + n
    gen_items, chk_items = [], []
    for t in tasks:
        tr = Transform.parse(t["task"])
        rng = random.Random(f"eval:{seed}:{t['name']}")
        for x in tr.inputs(per_task, seed + 17, "test"):
            if t["role"] == "task":
                gen_items.append((t["name"], enc.prompt(tr.prompt(x)), tr.apply(x)))
            else:
                good = rng.random() < 0.5
                cand = data.checker_candidate(tr, x, good, rng)
                chk_items.append((t["name"], data.checker_context(enc, tr, x, cand), good))
    correct: dict[str, dict[str, list[bool]]] = {v: collections.defaultdict(list) for v in variants}
    for v, name_of in variants.items():
        comps = _generate(engine, [p for _, p, _ in gen_items], [name_of(n) for n, _, _ in gen_items], 16)
        for (n, _, want), c in zip(gen_items, comps):
            correct[v][n].append(c.text == want)
        if chk_items:
            sc = yes_no_scores(engine, [c for _, c, _ in chk_items], VERIFY, [name_of(n) for n, _, _ in chk_items])
            for (n, _, good), s in zip(chk_items, sc):
                correct[v][n].append((s > 0.5) == good)
    per = {v: {n: _mean(xs) for n, xs in d.items()} for v, d in correct.items()}
    mean = {v: _mean(d.values()) for v, d in per.items()}
    out = {"count": len(tasks), "examples_per_task": per_task, "accuracy": mean, "per_task": per,
           "uncompressed_source": "live" if has_full else "not present (run `kilolora world build`)"}
    if has_full:
        den = mean["uncompressed"] - mean["base"]
        out["normalised_score"] = (mean["bank"] - mean["base"]) / den if den > 0 else None
        out["bank_over_uncompressed"] = mean["bank"] / mean["uncompressed"] if mean["uncompressed"] else None
    return out


def _majority(group) -> bool:
    answers = [parse_answer(s.text) for _, s in group]
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return False
    best = counts.most_common(1)[0][0]
    return best == group[0][1].problem.answer


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else 0.0
