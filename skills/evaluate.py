"""`kilolora world eval`: measure a world's base model and skills on held-out splits, served by
the engine exactly as the orchestrator uses them.

- base greedy accuracy on held-out arithmetic problems, also as a chat sends them (in words,
  after a system prompt and an earlier exchange); pass@k / majority / verifier-best-of-k on k
  samples, to show the headroom test-time strategies have;
- verifier AUROC on the base's own held-out samples (correct vs incorrect final answer);
- self-evaluation AUROC on the steps of those samples (first-error labelling);
- tool-selector precision / recall of calls at held-out step boundaries (a call counts when its
  expression is exactly the next product);
- per task of the family: accuracy of the uncompressed adapter, of its bank entry and of the base
  (no adapter), also per role and family (task/shift, task/add, task/replace, verifier/replace);
  the per-task verifiers' AUROC; the bank's size and reconstruction error; the normalised score
  (bank − base) / (uncompressed − base) of the mean accuracies.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    # the same problems as a chat sends them: asked in words, after a system prompt and an earlier exchange
    chat, rng = data.Encoder(tok, variety=1.0), random.Random(f"chat:{seed}")
    in_chat = _generate(engine, [chat.prompt(data.phrase(p.question, rng), rng) for p in probs], [None] * len(probs), 72)
    report["base_greedy_accuracy_in_chat"] = _mean(parse_answer(c.text) == p.answer for p, c in zip(probs, in_chat))
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


@dataclass
class TaskItems:
    """Held-out (or training-split) inputs of the task family: generation items of the task
    adapters (name, prompt ids, wanted text) and judgement items of the per-task verifiers
    (name, context ids, whether the candidate is right)."""

    gen: list[tuple[str, list[int], str]]
    chk: list[tuple[str, list[int], bool]]


def task_items(world: World, enc, per_task: int, seed: int = 0, split: str = "test",
               max_tasks: int | None = None) -> TaskItems:
    """`per_task` inputs of each task of the family from `split` ("test": held out; "train": the
    inputs a sweep chooses the bank on)."""
    tasks = world.tasks if max_tasks is None else world.tasks[:max_tasks]
    gen, chk = [], []
    for t in tasks:
        tr = Transform.parse(t["task"])
        rng = random.Random(f"eval:{seed}:{split}:{t['name']}" if split != "test" else f"eval:{seed}:{t['name']}")
        for x in tr.inputs(per_task, seed + 17, split):
            if t["role"] == "task":
                gen.append((t["name"], enc.prompt(tr.prompt(x)), tr.apply(x)))
            else:
                good = rng.random() < 0.5
                cand = data.checker_candidate(tr, x, good, rng)
                chk.append((t["name"], data.checker_context(enc, tr, x, cand), good))
    return TaskItems(gen, chk)


@dataclass
class TaskScores:
    """Per task: right / wrong per item (a task adapter's exact output; a verifier's P(yes) > 0.5
    on the right side), and the verifiers' P(yes) with their labels (for AUROC)."""

    correct: dict[str, list[bool]]
    verifier_scores: list[tuple[str, float, bool]]


def score_tasks(engine, items: TaskItems, adapter_of: Callable[[str], str | None]) -> TaskScores:
    """Run the items on `engine`, each under `adapter_of(task name)` (None: the base)."""
    correct: dict[str, list[bool]] = collections.defaultdict(list)
    comps = _generate(engine, [p for _, p, _ in items.gen], [adapter_of(n) for n, _, _ in items.gen], 16)
    for (n, _, want), c in zip(items.gen, comps):
        correct[n].append(c.text == want)
    vs = []
    if items.chk:
        sc = yes_no_scores(engine, [c for _, c, _ in items.chk], VERIFY, [adapter_of(n) for n, _, _ in items.chk])
        for (n, _, good), s in zip(items.chk, sc):
            correct[n].append((s > 0.5) == good)
            vs.append((n, s, good))
    return TaskScores(dict(correct), vs)


def group_of(task: dict) -> str:
    """`role/family` of a family member: task/shift, task/add, task/replace, verifier/replace."""
    return f"{task['role']}/{Transform.parse(task['task']).family}"


def summarize_tasks(world: World, scores: dict[str, TaskScores], per_task: int, max_tasks: int | None = None) -> dict:
    """The family's report from each variant's scores (variants: bank, base, uncompressed, ...):
    mean accuracy overall, per role/family and per task; verifier AUROC; normalised scores."""
    tasks = world.tasks if max_tasks is None else world.tasks[:max_tasks]
    groups = {t["name"]: group_of(t) for t in tasks}
    per = {v: {t["name"]: _mean(sc.correct.get(t["name"], [])) for t in tasks} for v, sc in scores.items()}
    mean = {v: _mean(d.values()) for v, d in per.items()}
    by_group: dict[str, dict[str, float]] = {}
    for g in sorted(set(groups.values())):
        by_group[g] = {v: _mean(a for n, a in d.items() if groups[n] == g) for v, d in per.items()}
        by_group[g]["count"] = sum(1 for x in groups.values() if x == g)
    out = {"count": len(tasks), "examples_per_task": per_task, "accuracy": mean, "by_group": by_group,
           "per_task": per}
    ver = {v: auroc([s for _, s, _ in sc.verifier_scores], [y for _, _, y in sc.verifier_scores])
           for v, sc in scores.items() if sc.verifier_scores}
    if ver:
        out["verifier_auroc"] = ver
    if "uncompressed" in scores and "base" in scores:
        out["normalised_score"] = normalised(mean["bank"], mean["base"], mean["uncompressed"])
        out["bank_over_uncompressed"] = mean["bank"] / mean["uncompressed"] if mean["uncompressed"] else None
        for g, d in by_group.items():
            d["normalised_score"] = normalised(d["bank"], d["base"], d["uncompressed"])
    return out


def normalised(bank: float, base: float, uncompressed: float) -> float | None:
    """(bank − base) / (uncompressed − base): the share of the adapters' gain over the base the
    bank keeps (None when the adapters gain nothing)."""
    den = uncompressed - base
    return (bank - base) / den if den > 0 else None


def _eval_tasks(engine, enc, world: World, per_task: int, seed: int, has_full: bool, max_tasks: int | None) -> dict:
    items = task_items(world, enc, per_task, seed, "test", max_tasks)
    variants = {"bank": lambda n: n, "base": lambda n: None}
    if has_full:
        variants["uncompressed"] = lambda n: "full/" + n
    scores = {v: score_tasks(engine, items, f) for v, f in variants.items()}
    out = summarize_tasks(world, scores, per_task, max_tasks)
    out["uncompressed_source"] = "live" if has_full else "not present (run `kilolora world build`)"
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
