"""The demo's bank part against references: its users' accuracy recomputed item for item by the
engine directly (`Engine.generate`, `skills.evaluate.yes_no_scores` on `task_items`' own
contexts), one request and one distinct adapter per entry, the throughput's arithmetic, and the
per-task verifiers' best-of-n checked against its traces and against the verifier's scores
computed directly. A Score whose skill is a function of the state runs on the fake backend."""

from __future__ import annotations

import pytest
import torch

from orchestrator import Executor, Fork, Generate, Graph, GraphError, Join, Score, State
from orchestrator import demo as dm
from orchestrator.graph import top
from orchestrator.world import world_executor
from skills import data
from skills.evaluate import task_items, yes_no_scores
from skills.tasks import Transform
from skills.tokenizer import EOS, VERIFY
from skills.world import World

from .fake_backend import FakeBackend, _h

ENTRIES = 40
"""bank entries served in these tests (half tasks, half verifiers, spread over the families)"""


@pytest.fixture(scope="module")
def world():
    return World.load()


@pytest.fixture(scope="module")
def ex(world):
    return world_executor(world)


@pytest.fixture(scope="module")
def report(ex, world):
    return dm.run_bank(ex, world, 0, max_entries=ENTRIES, repeats=2, decode_tokens=160)


def test_one_request_and_one_distinct_adapter_per_bank_entry(world, ex, report):
    names = [t["name"] for t in world.tasks]
    full = dm.bank_requests(world, ex.backend.tokenizer, dm.bank_entries(world), 0)
    assert sorted(r.entry for r in full) == sorted(names) and len(full) == len(world.tasks)
    u = report["users"]
    assert u["requests"] == u["distinct_adapters"] == report["entries"] == ENTRIES
    assert u["bank_entries"] == len(world.tasks)
    assert u["tasks"] == u["verifiers"] == ENTRIES // 2  # the world has more than 20 of each
    assert u["engine_steps"] >= 1


def test_bank_accuracy_matches_the_engine_item_for_item(world, ex, report):
    """Reference: `Engine.generate` on `task_items`' prompt ids and `yes_no_scores` (two scored
    continuations) on its verifier contexts, each under its own bank entry."""
    from serving.sampling import SamplingParams

    eng, tok = ex.backend.engine, ex.backend.tokenizer
    keep = set(dm.bank_entries(world, ENTRIES))
    items = task_items(world, data.Encoder(tok), 1, 0, "test")
    gen = [g for g in items.gen if g[0] in keep]
    chk = [c for c in items.chk if c[0] in keep]
    reqs = dm.bank_requests(world, tok, sorted(keep), 0)
    assert [r.entry for r in reqs] == [n for n, _, _ in gen] + [n for n, _, _ in chk]
    for r, ids in zip(reqs, [p for _, p, _ in gen] + [c + tok.encode(VERIFY, add_special_tokens=False)
                                                       for _, c, _ in chk]):
        assert tok.encode(r.prompt, add_special_tokens=False) == ids  # the text is the same tokens

    got = dm.serve_requests(ex.backend, ex.skills, reqs, lambda e: e)
    outs = eng.generate([p for _, p, _ in gen], adapter=[n for n, _, _ in gen],
                        params=SamplingParams(max_tokens=dm.TASK_TOKENS, temperature=0.0))
    probs = yes_no_scores(eng, [c for _, c, _ in chk], VERIFY, [n for n, _, _ in chk])
    want_gen = [(o.text, o.text == w) for o, (_, _, w) in zip(outs, gen)]
    assert [g for g in got[:len(gen)]] == want_gen
    torch.testing.assert_close(torch.tensor([p for p, _ in got[len(gen):]], dtype=torch.float64),
                               torch.tensor(probs, dtype=torch.float64), atol=1e-4, rtol=0)
    want_chk = [(p > 0.5) == good for p, (_, _, good) in zip(probs, chk)]
    assert [ok for _, ok in got[len(gen):]] == want_chk

    right = [ok for _, ok in want_gen] + want_chk
    u = report["users"]
    assert u["accuracy"]["bank"] == pytest.approx(sum(right) / len(right))
    assert u["by_role"]["bank"]["task"] == pytest.approx(sum(ok for _, ok in want_gen) / len(gen))
    assert u["by_role"]["bank"]["verifier"] == pytest.approx(sum(want_chk) / len(chk))
    assert sorted(u["wrong"]) == sorted(r.entry for r, ok in zip(reqs, right) if not ok)
    # non-vacuous: the adapters carry what the base lacks
    base = dm.serve_requests(ex.backend, ex.skills, reqs, lambda e: None)
    assert u["accuracy"]["base"] == pytest.approx(sum(ok for _, ok in base) / len(base))
    assert u["accuracy"]["bank"] > u["accuracy"]["base"] + 0.25  # measured 0.80 vs 0.425 (verifiers: chance 0.5)
    assert sum(a != b for (a, _), (b, _) in zip(got[:len(gen)], base[:len(gen)])) > len(gen) // 2


def test_uncompressed_is_recorded_never_invented(world, report):
    u = report["users"]
    if world.has_uncompressed():
        pytest.skip("this world ships its uncompressed adapters")
    assert u["accuracy"]["uncompressed"] is None and "uncompressed" not in u["wall_s"]
    assert u["uncompressed_source"] == "recorded at build"
    assert u["recorded_at_build"] == world.manifest["eval"]["tasks"]["accuracy"]


def test_live_uncompressed_adapters_are_measured_on_the_same_requests(world, ex, report, tmp_path):
    """Stand-ins for the original adapters: each entry's dense export (`Bank.export`, the same
    function as the entry) served as `full/<entry>`, as `World.engine(uncompressed=True)` serves
    the originals: measured live, they answer as the bank does."""
    from compression.bank import Bank
    from rich.console import Console

    from orchestrator.cli.demo import _print_bank

    bank, eng = Bank.load(world.bank_dir), ex.backend.engine
    names = dm.bank_entries(world, ENTRIES)
    for name in names:
        eng.load_adapter("full/" + name, bank.export(name, tmp_path / name))
    try:
        r = dm.run_bank(ex, world, 0, uncompressed=True, max_entries=ENTRIES, repeats=1, decode_tokens=40)
    finally:
        for name in names:
            eng.unload_adapter("full/" + name)
    u = r["users"]
    assert u["uncompressed_source"] == "live" and u["wall_s"]["uncompressed"] > 0
    assert u["accuracy"]["bank"] == report["users"]["accuracy"]["bank"]
    assert u["accuracy"]["uncompressed"] == pytest.approx(u["accuracy"]["bank"], abs=1.5 / ENTRIES)  # float noise
    console = Console(record=True, width=240)
    _print_bank(r, "in-process", console)
    out = console.export_text()
    assert "recorded at build" not in out and f"{u['accuracy']['uncompressed']:.3f}" in out


def test_throughput_decodes_the_same_tokens_on_bank_and_base(report):
    th = report["users"]["throughput"]
    assert th["requests"] == th["distinct_adapters"] == ENTRIES
    assert th["decode_tokens_per_request"] == 4  # ceil(160 / 40)
    for k in ("bank", "base"):
        assert len(th["passes"][k]) == th["repeats"] == 2
        for p in th["passes"][k]:
            assert p["tokens"] == th["tokens_per_pass"] == ENTRIES * 4 and p["seconds"] > 0 and p["tok_s"] > 0
        assert th[f"{k}_tok_s"] == max(p["tok_s"] for p in th["passes"][k]) > 0
    assert th["ratio"] == round(th["bank_tok_s"] / th["base_tok_s"], 4)


def test_best_of_n_picks_the_verifiers_max_and_matches_the_references(world, ex):
    """The join keeps the highest-scoring sample; each score is the task's own verifier's P(yes)
    on that sample, computed directly; greedy is the engine's greedy under the task adapter."""
    from serving.sampling import SamplingParams

    eng, tok = ex.backend.engine, ex.backend.tokenizer
    enc = data.Encoder(tok)
    entries = dm.bank_entries(world, ENTRIES)
    cases, picked, greedy, seconds = dm.verified_runs(ex, world, entries, n=4, seed=0)
    judge = {Transform.parse(t["task"]).name: t["name"] for t in world.tasks if t["role"] == "verifier"}
    assert [s.task for s, _ in cases] == [Transform.parse(t["task"]).name for t in world.tasks
                                          if t["role"] == "verifier" and t["name"] in entries]
    ctxs, adapters, traced = [], [], []
    for (state, want), run in zip(cases, picked):
        tr = Transform.parse(next(t["task"] for t in world.tasks if t["name"] == state.task))
        x = state.prompt.split(": ", 1)[1]
        assert tr.apply(x) == want
        samples = {e["branch"]: e for e in run.trace.of("node") if e["node"] == "sample"}
        scores = {e["branch"]: e for e in run.trace.of("score")}
        assert len(samples) == 4 and {e["adapter"] for e in samples.values()} == {state.task}
        assert {e["skill"] for e in scores.values()} == {judge[state.task]}
        (join,) = run.trace.of("join")
        best = max(range(4), key=lambda i: (join["scores"][i], -i))
        assert join["kept"] == [join["branches"][best]]
        assert run.text == samples[join["branches"][best]]["output"]
        for b in join["branches"]:  # what the verifier read: the answer and its end, if it ended
            ended = samples[b]["finish"] == "stop"
            ctxs.append(data.checker_context(enc, tr, x, samples[b]["output"]) if ended else
                        enc.prompt(tr.prompt(x)) + enc.ids(samples[b]["output"]))
            adapters.append(judge[state.task])
            traced.append(scores[b]["value"])
    direct = yes_no_scores(eng, ctxs, VERIFY, adapters)
    torch.testing.assert_close(torch.tensor(traced, dtype=torch.float64), torch.tensor(direct, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    outs = eng.generate([enc.prompt(s.prompt) for s, _ in cases], adapter=[s.task for s, _ in cases],
                        params=SamplingParams(max_tokens=dm.TASK_TOKENS, temperature=0.0))
    assert [r.text for r in greedy] == [o.text for o in outs]

    v = dm.verified_summary(cases, picked, greedy, seconds, 4)
    m = len(cases)
    assert v["tasks"] == m and v["verifier_calls"] == 4 * m
    assert v["best_of_n_accuracy"] == sum(r.text == w for r, (_, w) in zip(picked, cases)) / m
    assert v["greedy_accuracy"] == sum(r.text == w for r, (_, w) in zip(greedy, cases)) / m
    assert v["best_of_n_accuracy"] <= v["pass_at_n"]
    # every context token of a verifier call was computed or reused: the prompt's cached blocks
    # are reused, the answer the (standard) task adapter wrote is recomputed under the base
    assert v["prefilled"] + v["reused"] == sum(len(c) + 1 for c in ctxs)
    assert v["reused"] > 0 and v["prefilled_per_call"] > 2


def test_the_bank_table_says_where_each_figure_comes_from(world, report):
    from rich.console import Console

    from orchestrator.cli.demo import _print_bank

    console = Console(record=True, width=240)
    _print_bank(report, "in-process", console)
    out = console.export_text()
    assert f"the bank: {ENTRIES} users, {ENTRIES} adapters, one batch" in out
    th = report["users"]["throughput"]
    assert f"bank/base = {th['ratio']:.2f}" in out and "best-of-4" in out
    if not world.has_uncompressed():
        rec = world.manifest["eval"]["tasks"]["accuracy"]["uncompressed"]
        assert "uncompressed (recorded at build)" in out and f"{rec:.3f}" in out


def test_run_demo_skips_the_bank_on_request(world):
    r = dm.run_demo(world, n_problems=1, n=2, names=("greedy",), bank=False)
    assert "bank" not in r and set(r["strategies"]) == {"greedy"}


def test_the_bank_over_http_gets_the_in_process_results(world, ex, report, world_server):
    """The same requests through `kilolora serve`: the same answers; no throughput (it says why)."""
    from orchestrator.http_backend import HttpBackend

    backend = HttpBackend(world_server + "/v1")
    try:
        remote = dm.run_bank(Executor(backend, ex.skills), world, 0, max_entries=ENTRIES)
    finally:
        backend.shutdown()
    u, local = remote["users"], report["users"]
    assert u["requests"] == u["distinct_adapters"] == ENTRIES
    assert u["accuracy"] == local["accuracy"] and u["wrong"] == local["wrong"]
    assert u["throughput"] is None and "over HTTP" in u["throughput_note"] and u["engine_steps"] is None
    for k in ("tasks", "greedy_accuracy", "best_of_n_accuracy", "pass_at_n", "verifier_calls"):
        assert remote["verifiers"][k] == report["verifiers"][k], k


# ------------------------------------------------------------------ Score(skill=f(state)), fake backend


class Task(State):
    task: str = ""


def _verifier_names(world, k: int = 2) -> list[str]:
    return [t["name"] for t in world.tasks if t["role"] == "verifier"][:k]


def test_score_skill_may_be_a_function_of_the_state(world):
    """Each run is judged by the skill its state names; the score is the fake model's P(yes) for
    that skill's adapter on the branch's own context (reference: the fake's formula)."""
    backend = FakeBackend()
    skills = {s.name: s for s in world.skills()}
    ex = Executor(backend, skills)
    checks = _verifier_names(world)
    tasks = [Transform.parse(next(t["task"] for t in world.tasks if t["name"] == c)).name for c in checks]
    g = Graph(Task, "per_task")
    g.add("fork", Fork(3))
    g.add("sample", Generate(adapter=lambda s: s.task, max_tokens=64, temperature=1.0))
    g.add("verify", Score(lambda s: "check-" + s.task))
    g.add("pick", Join(select=top(1)))
    g.chain("fork", "sample", "verify", "pick")
    assert "score [f(state)]" in g.mermaid()
    runs = ex.run_many(g, [Task(prompt=f"replace: abc{i}", task=t) for i, t in enumerate(tasks)], seed=5)
    for run, task in zip(runs, tasks):
        skill = skills["check-" + task]
        samples = {e["branch"]: e["output"] for e in run.trace.of("node") if e["node"] == "sample"}
        scores = {e["branch"]: e for e in run.trace.of("score")}
        assert {e["skill"] for e in scores.values()} == {skill.name}
        verify = [e for e in run.trace.of("node") if e["node"] == "verify"]
        assert {e["adapter"] for e in verify} == {skill.adapter}
        for b, text in samples.items():
            assert text.startswith(f"<{task}>")  # the generator was the state's task adapter
            ctx = backend.chat_prompt(run.state.prompt) + text + EOS + skill.suffix
            want = 0.05 + 0.9 * (_h(ctx, skill.adapter) % 1000) / 1000
            assert scores[b]["value"] == pytest.approx(want, abs=1e-6)
        (join,) = run.trace.of("join")
        best = max(range(3), key=lambda i: (join["scores"][i], -i))
        assert join["kept"] == [join["branches"][best]] and run.state.score == join["scores"][best]


def test_score_skill_function_is_validated(world):
    ex = Executor(FakeBackend(), {s.name: s for s in world.skills()})
    for skill, match in ((lambda s: "check-nope", r"no skill 'check-nope'"), (lambda s: 3, r"returned 3"),
                         (lambda s: "", r"returned ''")):
        g = Graph(Task, "bad")
        g.add("verify", Score(skill))
        with pytest.raises(GraphError, match=match):
            ex.run(g, Task(prompt="x", task="t"))
    for bad in ("", None, 3):
        with pytest.raises(TypeError, match="skill must be a skill name or a function of the state"):
            Score(bad)
