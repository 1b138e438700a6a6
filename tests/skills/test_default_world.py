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
MEASURED_VERIFIER_AUROC_WITHIN = 1.0  # over the 10 problems whose 4 samples disagree
MEASURED_SELF_EVAL_AUROC = 1.0
MARGIN = 0.08
# The family's figures recorded at build (`world.json` eval, every adapter x 8 held-out inputs;
# the uncompressed adapters are not shipped, so their side is the build's measurement). The
# issue's targets are 0.95 normalised and an AUROC drop within 0.02: the shipped bank, the
# sweep's choice among the banks saving >= 95%, misses both (see README: the frontier).
MEASURED_NORMALISED = 0.846
MEASURED_CHECKERS_AUROC = 0.795  # the 330 per-task verifiers from the bank; uncompressed 0.838


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
    assert len(world.tasks) >= 1000  # the family: 684 transformations and 330 per-task verifiers
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
    assert report["tasks"]["count"] >= 1000


def test_skills_beat_chance_on_a_fixed_sample(report):
    assert report["verifier_auroc"] > MEASURED_VERIFIER_AUROC - MARGIN
    # within one problem too: it tells a problem's right samples from its wrong ones
    assert report["verifier_auroc_within_problem"] > MEASURED_VERIFIER_AUROC_WITHIN - MARGIN
    # so best-of-4 by the verifier reaches pass@4 (measured 0.675 = 0.675; greedy 0.575)
    assert report["verifier_best_of_4"] >= report["pass_at_4"] - 0.05
    assert report["verifier_best_of_4"] > report["base_greedy_accuracy"]
    assert report["self_eval_auroc"] > MEASURED_SELF_EVAL_AUROC - MARGIN
    assert report["tool_selector_precision"] > 0.9 and report["tool_selector_recall"] > 0.9


def test_bank_saves_95_percent_and_keeps_the_measured_quality(world, report):
    tasks, bank = report["tasks"], report["bank"]
    recorded = world.manifest["eval"]["tasks"]
    # the bank against the family it compresses: every lora_A + lora_B of 1014 rank-16 adapters
    assert bank["adapters"] == len(world.tasks) >= 1000 and bank["rank"] == 16
    assert bank["params_saved"] >= 0.95
    assert bank["params_before"] == sum(16 * (i + o) for i, o in _target_shapes(world)) * len(world.tasks)
    # Live, on every entry of the shipped bank (greedy, the build's held-out inputs): the same
    # accuracy the build measured for this bank ...
    assert tasks["accuracy"]["bank"] == pytest.approx(recorded["accuracy"]["bank"], abs=0.01)
    # ... whose normalised score against the uncompressed adapters (measured at build on the same
    # inputs) is what the build recorded
    rec = tasks["recorded_at_build"]
    unc, base = rec["accuracy"]["uncompressed"], tasks["accuracy"]["base"]
    assert unc > base + 0.5  # the task adapters really learned their tasks
    assert (tasks["accuracy"]["bank"] - base) / (unc - base) > MEASURED_NORMALISED - 0.02
    # the per-task verifiers work from the bank (chance is 0.5), a little below uncompressed
    checks = [v for n, v in tasks["per_task"]["bank"].items() if n.startswith("check-")]
    assert len(checks) == 330
    auroc = tasks["verifier_auroc"]
    assert auroc["bank"] > MEASURED_CHECKERS_AUROC - 0.02 and auroc["bank"] > auroc["base"] + 0.15
    assert rec["verifier_auroc"]["uncompressed"] - auroc["bank"] < 0.1


def _target_shapes(world):
    """(in, out) features of every adapted projection of the base (all seven, every layer)."""
    from serving.config import ModelConfig

    cfg = ModelConfig.from_dir(world.base_dir)
    modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return [cfg.module_shape(m) for m in modules] * cfg.num_layers


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
