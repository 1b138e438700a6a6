"""The embedded default world: it ships in the package, loads with transformers / peft, and its
skills measurably work on a fixed held-out sample (`kilolora world eval`, a real subprocess)."""

from __future__ import annotations

import json
import warnings

import pytest

from compression.bank import Bank
from skills.world import DEFAULT_WORLD, World
from tests.orchestrator.test_cli import kilolora

# Measured with the shipped world on the fixed sample below (problems=40, samples=4, seed=0,
# `kilolora world eval --json --problems 40 --samples 4 --per-task 8`); the tests allow a margin
# for other CPUs' numerics.
MEASURED_VERIFIER_AUROC = 0.999
MEASURED_VERIFIER_AUROC_WITHIN = 1.0  # over the 18 problems whose 4 samples disagree
MEASURED_SELF_EVAL_AUROC = 1.0
MEASURED_CHECKERS_ACCURACY = 0.805  # the 25 per-task verifiers, from the bank
MARGIN = 0.08


@pytest.fixture(scope="module")
def world():
    return World.load()


@pytest.fixture(scope="module")
def report():
    """`world eval --json` on a fixed sample: 40 problems x 4 samples, every task adapter x 8 inputs
    (the same inputs as the evaluation recorded at build)."""
    return json.loads(kilolora("world", "eval", "--json", "--problems", 40, "--samples", 4, "--per-task", 8).stdout)


def test_embedded_world_is_small_and_complete(world):
    shipped = [p for p in DEFAULT_WORLD.rglob("*") if p.is_file() and "adapters" not in p.relative_to(DEFAULT_WORLD).parts]
    assert sum(p.stat().st_size for p in shipped) < 50 * 2**20
    assert {s.role for s in world.skills()} == {"verifier", "self_eval", "tool_selector", "task"}
    assert len(world.tasks) >= 300
    bank = Bank.load(world.bank_dir)
    assert sorted(bank.names) == sorted(t["name"] for t in world.tasks)
    assert {t["role"] for t in world.tasks} == {"task", "verifier"}  # transformations and per-task verifiers
    # the manifest's build settings are the defaults: `kilolora world build` rebuilds this world
    from dataclasses import asdict

    from skills.build import BuildConfig

    assert world.manifest["build"] == asdict(BuildConfig())


def test_embedded_world_loads_with_transformers_and_peft(world):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world.base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(world.base_dir))
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 2e7
    assert tok.apply_chat_template([{"role": "user", "content": "1+1"}], tokenize=False,
                                   add_generation_prompt=True).endswith("<|assistant|>")
    for name in ("verifier", "self_eval", "tool_selector"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(model, str(world.skill_dir(name)), adapter_name=name)
        assert peft_model.peft_config[name].alora_invocation_tokens == tok.encode(world.skill(name).invocation,
                                                                                  add_special_tokens=False)
        model = peft_model.unload()


def test_world_eval_reports_every_field(report):
    for f in ("base_greedy_accuracy", "verifier_auroc", "self_eval_auroc", "tool_selector_precision",
              "tool_selector_recall", "bank", "tasks"):
        assert f in report
    for f in ("params_saved", "rel_error_mean", "params_after", "params_before"):
        assert f in report["bank"]
    assert report["tasks"]["count"] >= 300


def test_skills_beat_chance_on_a_fixed_sample(report):
    assert report["verifier_auroc"] > MEASURED_VERIFIER_AUROC - MARGIN
    # within one problem too: it tells a problem's right samples from its wrong ones
    assert report["verifier_auroc_within_problem"] > MEASURED_VERIFIER_AUROC_WITHIN - MARGIN
    # so best-of-4 by the verifier reaches pass@4 (measured 0.75 = 0.75; greedy 0.625)
    assert report["verifier_best_of_4"] >= report["pass_at_4"] - 0.05
    assert report["verifier_best_of_4"] > report["base_greedy_accuracy"]
    assert report["self_eval_auroc"] > MEASURED_SELF_EVAL_AUROC - MARGIN
    assert report["tool_selector_precision"] > 0.9 and report["tool_selector_recall"] > 0.9


def test_bank_keeps_95_percent_of_uncompressed_accuracy(world, report):
    tasks = report["tasks"]
    recorded = world.manifest["eval"]["tasks"]
    # Live, on every task adapter from the shipped bank (greedy, the build's held-out inputs): the
    # same accuracy the build measured for this bank ...
    assert tasks["accuracy"]["bank"] == pytest.approx(recorded["accuracy"]["bank"], abs=0.01)
    # ... which keeps >= 95% of the uncompressed adapters' accuracy, measured at build on the same
    # inputs (the uncompressed family is not shipped; `kilolora world build` regenerates it).
    unc = tasks["recorded_at_build"]["accuracy"]["uncompressed"]
    assert tasks["accuracy"]["bank"] >= 0.95 * unc
    assert unc > tasks["accuracy"]["base"] + 0.5  # the task adapters really learned their tasks
    # the per-task verifiers, too, work from the bank (chance is 0.5)
    checks = [v for n, v in tasks["per_task"]["bank"].items() if n.startswith("check-")]
    assert len(checks) == 25
    assert sum(checks) / len(checks) > MEASURED_CHECKERS_ACCURACY - MARGIN


def test_yes_no_skills_put_their_mass_on_their_answers(world):
    """The answer tokens are ones the base can predict confidently (see skills/tokenizer.py: with
    `Y`/`N` no adapter could give an answer more than ~37%): after the invocation, a yes/no skill
    puts nearly all of its probability on yes + no."""
    import math

    from skills.tasks import Problem, Step

    engine = world.engine(bank=False)
    tok = engine.tokenizer
    p = Problem("58*6+31", (Step(58, "*", 6), Step(348, "+", 31)))
    prompt = tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                     add_generation_prompt=True)
    from skills.data import calc_checks, evidence

    for name, text, end in (("verifier", p.solution(), tok.eos_token), ("self_eval", "58*6=348.", "")):
        skill = world.skill(name)
        seq = engine.open(prompt + text + end)
        suffix = skill.suffix + evidence(calc_checks(text))  # both read the calculator's verdicts
        (yes, _), (no, _) = engine.score_many([(seq, suffix + skill.yes, name), (seq, suffix + skill.no, name)])
        engine.close(seq)
        assert math.exp(yes[-1]) + math.exp(no[-1]) > 0.95, name
        assert math.exp(yes[-1]) > 0.9, name  # and both are right: this solution and step are correct
