"""`kilolora world build --quick` end to end (real subprocesses): every output loads with
transformers / peft, peft reproduces the engine on every exported adapter, and `world eval`
reports every field. The world (`quick_world`) is built once, in conftest.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from serving.engine import Engine
from skills.spec import Skill
from skills.world import World
from tests.orchestrator.test_cli import kilolora

FIELDS = ["base_greedy_accuracy", "verifier_auroc", "self_eval_auroc", "tool_selector_precision",
          "tool_selector_recall", "sample_accuracy", "pass_at_2", "majority_of_2", "verifier_best_of_2"]


def test_quick_build_writes_a_complete_world(quick_world):
    m = quick_world.manifest
    assert m["build"]["seed"] == 1 and m["build_seconds"]["total"] > 0
    roles = {s.role for s in quick_world.skills()}
    assert roles == {"verifier", "self_eval", "tool_selector", "task"}
    assert all(isinstance(s, Skill) for s in quick_world.skills())
    assert len(quick_world.tasks) == 2 + 1 + 2 + 1  # shift, add, replace, one per-task verifier
    assert quick_world.has_uncompressed()
    for f in FIELDS:
        assert f in m["eval"]
    assert not list(quick_world.path.parent.glob(".world.*"))  # no temp dir left behind


def test_outputs_load_with_transformers_and_peft_reproduces_the_engine(quick_world):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(quick_world.base_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "12*34+5"}], tokenize=False, add_generation_prompt=True)
    engine = Engine.from_pretrained(quick_world.base_dir)
    dirs = {s.name: quick_world.skill_dir(s.name) for s in quick_world.skills() if s.role != "task"
            and not s.name.startswith("check-")}
    dirs.update({t["name"]: quick_world.adapters_dir / t["name"] for t in quick_world.tasks})
    assert len(dirs) == 3 + len(quick_world.tasks)
    for name, d in dirs.items():
        skill = quick_world.skill(name)
        ids = tok.encode(skill.render(prompt + "12*34=408. ") + skill.yes, add_special_tokens=False)
        engine.load_adapter(name, d)
        seq = engine.open(ids[:1])
        got = torch.tensor(engine.score(seq, ids[1:], adapter=name))
        engine.close(seq)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(quick_world.base_dir)), str(d))
        with torch.no_grad():
            logits = model.eval()(input_ids=torch.tensor([ids])).logits[0]
            with model.disable_adapter():
                base = model(input_ids=torch.tensor([ids])).logits[0]
        assert (logits - base).abs().max() > 1e-4, name  # the adapter was trained: it changes the output
        want = F.log_softmax(logits[:-1].float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)


def test_world_eval_json_reports_every_field(quick_world):
    report = json.loads(kilolora("world", "eval", "--world", quick_world.path, "--json", "--problems", 6,
                                 "--samples", 2, "--per-task", 2).stdout)
    for f in FIELDS:
        assert f in report
    tasks = report["tasks"]
    assert tasks["uncompressed_source"] == "live" and tasks["count"] == len(quick_world.tasks)
    assert set(tasks["accuracy"]) == {"bank", "base", "uncompressed"}
    assert "normalised_score" in tasks and 0 <= report["base_greedy_accuracy"] <= 1
    assert report["bank"]["adapters"] == len(quick_world.tasks) and 0 < report["bank"]["params_saved"] < 1
    table = kilolora("world", "eval", "--world", quick_world.path, "--problems", 3, "--samples", 2,
                     "--per-task", 1).stdout
    assert "verifier AUROC" in table and "normalised score" in table


def test_world_commands_refuse_bad_input(quick_world, tmp_path):
    proc = kilolora("world", "build", "--quick", "--out", quick_world.path, check=False)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    proc = kilolora("world", "eval", "--world", tmp_path, check=False)
    assert proc.returncode == 1 and "not a kilolora world" in proc.stderr
    proc = kilolora("world", "eval", "--world", quick_world.path, "--problems", 0, check=False)
    assert proc.returncode == 1 and "--problems" in proc.stderr


def test_world_rebank_recompresses_in_place(quick_world, tmp_path):
    import shutil

    from compression.bank import Bank
    from compression.compress import CompressConfig, compress
    from compression.peft_io import load_collection

    world = tmp_path / "world"
    shutil.copytree(quick_world.path, world)
    proc = kilolora("world", "rebank", "--world", world, "--method", "jd-diag", "--rank", 3, "--clusters", 1,
                    "--no-eval")
    assert "rebanked" in proc.stderr
    w = World.load(world)
    b = w.manifest["build"]
    assert (b["bank_method"], b["bank_rank"], b["bank_clusters"], b["bank_dtype"]) == ("jd-diag", 3, 1, "bfloat16")
    assert "eval" not in w.manifest  # the old evaluation measured the old bank
    bank = Bank.load(w.bank_dir)
    names = [t["name"] for t in w.tasks]
    assert sorted(bank.names) == sorted(names)
    # the same bank as compressing the world's PEFT adapters directly
    want = compress(load_collection([str(w.adapters_dir / n) for n in names]),
                    CompressConfig(method="jd-diag", rank=3, clusters=1, seed=b["seed"], dtype="bfloat16"))
    want.save(tmp_path / "want")
    want = Bank.load(tmp_path / "want")
    for n in names:
        got, ref = bank.reconstruct(n), want.reconstruct(n)
        assert got.keys() == ref.keys()
        for k in got:
            torch.testing.assert_close(got[k], ref[k])
    assert not list(world.glob(".rebank.*"))
    # a world without its uncompressed adapters (the embedded one) cannot be rebanked
    shutil.rmtree(w.adapters_dir)
    proc = kilolora("world", "rebank", "--world", world, "--rank", 2, check=False)
    assert proc.returncode == 1 and "no uncompressed adapters" in proc.stderr and "Traceback" not in proc.stderr
    proc = kilolora("world", "rebank", "--world", world, "--rank", 0, check=False)
    assert proc.returncode == 1 and "--rank" in proc.stderr


def test_world_retrain_replaces_only_the_chosen_skills(quick_world, tmp_path):
    import hashlib
    import shutil

    w = tmp_path / "world"
    shutil.copytree(quick_world.path, w)

    def digest(p):
        return hashlib.sha256((p / "adapter_model.safetensors").read_bytes()).hexdigest()

    before = {n: digest(w / "skills" / n) for n in ("verifier", "self_eval", "tool_selector")}
    bank = (w / "bank" / "bank.safetensors").read_bytes()
    proc = kilolora("world", "retrain", "--world", w, "--skills", "verifier", "--steps", "6", "--batch", "8")
    assert "retrained verifier" in proc.stderr
    after = {n: digest(w / "skills" / n) for n in before}
    assert after["verifier"] != before["verifier"]
    assert after["self_eval"] == before["self_eval"] and after["tool_selector"] == before["tool_selector"]
    assert (w / "bank" / "bank.safetensors").read_bytes() == bank
    m = World.load(w).manifest
    assert m["retrained"]["skills"] == ["verifier"] and m["retrained"]["steps"] == 6
    assert World.load(w).skill("verifier").evidence == "calculator" and "eval" in m
    assert not [p for p in w.iterdir() if p.name.startswith(".retrain")]  # nothing left behind
    bad = kilolora("world", "retrain", "--world", w, "--skills", "tool_selector", check=False)
    assert bad.returncode == 1 and "can retrain" in bad.stderr


def _tensors(world: World) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for d in sorted((world.path / "skills").iterdir()) + sorted(world.adapters_dir.iterdir()):
        out |= {f"{d.name}/{k}": t for k, t in load_file(str(d / "adapter_model.safetensors")).items()}
    return out


def test_an_interrupted_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    """A quick build killed in the adapter stage, run again: the finished stages are not redone,
    training goes on from its last checkpoint, and every adapter equals an uninterrupted build's."""
    from skills import build as B

    cfg = B.BuildConfig.quick(seed=2)
    cfg.adapter_steps = 20
    whole = B.build(tmp_path / "whole", cfg, evaluate_after=False, checkpoint_every=5)

    real_step = B.multi_lora_step
    calls = {"n": 0}

    def dying_step(*a, **kw):
        step = real_step(*a, **kw)

        def run(batch, lr):
            calls["n"] += 1
            if calls["n"] == 13:
                raise KeyboardInterrupt
            return step(batch, lr)
        return run

    monkeypatch.setattr(B, "multi_lora_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        B.build(tmp_path / "resumed", cfg, evaluate_after=False, checkpoint_every=5)
    work = tmp_path / ".resumed.build"
    assert {p.stem for p in (work / "stages").glob("*.json")} == {"base", "sampling"}
    assert json.loads((work / "adapters.ckpt" / "loop.json").read_text())["step"] == 10
    assert not (tmp_path / "resumed").exists()

    monkeypatch.setattr(B, "multi_lora_step", real_step)
    monkeypatch.setattr(B, "train_base", lambda *a, **k: pytest.fail("the finished base stage ran again"))
    monkeypatch.setattr(B, "sample_solutions", lambda *a, **k: pytest.fail("the finished sampling ran again"))
    resumed = B.build(tmp_path / "resumed", cfg, evaluate_after=False, checkpoint_every=5)
    assert not work.exists()
    a, b = _tensors(whole), _tensors(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    assert resumed.manifest["training"]["tasks_final_loss"] == whole.manifest["training"]["tasks_final_loss"]


def test_a_build_with_other_settings_does_not_reuse_the_work_directory(tmp_path, monkeypatch):
    from skills import build as B

    cfg = B.BuildConfig.quick(seed=3)
    monkeypatch.setattr(B, "sample_solutions", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        B.build(tmp_path / "w", cfg, evaluate_after=False)
    other = B.BuildConfig.quick(seed=3)
    other.bank_rank = 3
    with pytest.raises(ValueError, match="bank_rank"):
        B.build(tmp_path / "w", other, evaluate_after=False)
    with pytest.raises(ValueError, match="--from must be one of"):
        B.build(tmp_path / "w", other, evaluate_after=False, from_stage="bogus")


def test_progress_shows_a_loss_only_where_there_is_one():
    from types import SimpleNamespace

    from skills.build import _loss_text

    assert _loss_text(SimpleNamespace(fields={"loss": 0.12345})) == "loss 0.123"
    for fields in ({"loss": float("nan")}, {}, {"loss": float("inf")}):  # compression phases, loading
        assert _loss_text(SimpleNamespace(fields=fields)) == ""
