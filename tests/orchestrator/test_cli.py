"""The `kilolora` command as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compression import Bank, load_adapter
from compression.synthetic import PlantedSpec, write_planted


def kilolora(*args, check=True, timeout=300) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "kilolora"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "orchestrator.cli"]
    proc = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kilolora {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def small_spec(**kw) -> PlantedSpec:
    base = dict(n=12, modules=(("q_proj", 32, 32), ("v_proj", 32, 16)), layers=1, r=4, shared_rank=4, groups=3, noise=0.0)
    base.update(kw)
    return PlantedSpec(**base)


def test_help_explains_every_command():
    assert "compress" in kilolora("--help").stdout
    out = kilolora("compress", "--help").stdout
    for flag in ("--method", "--rank", "--clusters", "--iters", "--seed", "--device", "-o OUT"):
        assert flag in out
    for cmd in ("info", "export", "add"):
        assert kilolora("bank", cmd, "--help").returncode == 0


def test_compress_info_export_add(tmp_path):
    kilolora("make-collection", "-o", tmp_path / "col", "--n", 60, "--groups", 3, "--hidden", 32, "--layers", 1, "--r", 4, "--shared-rank", 4, "--noise", 0)
    run = kilolora("compress", tmp_path / "col", "-o", tmp_path / "bank", "--rank", 4, "--clusters", 3, "--json")
    summary = json.loads(run.stdout)
    assert summary["adapters"] == 60 and summary["clusters"] == 3 and summary["targets"] == 2
    assert sorted(summary["cluster_sizes"]) == [20, 20, 20]
    assert summary["rel_error_max"] < 1e-4 and summary["params_saved"] > 0.7
    assert "fitting" in run.stderr  # the progress bar

    info = json.loads(kilolora("bank", "info", tmp_path / "bank", "--json").stdout)
    assert {k: info[k] for k in ("params_before", "params_after", "rel_error_mean")} == {
        k: summary[k] for k in ("params_before", "params_after", "rel_error_mean")
    }
    assert "parameters" in kilolora("bank", "info", tmp_path / "bank").stdout

    kilolora("bank", "export", tmp_path / "bank", "adapter_0007", "-o", tmp_path / "exported")
    exported, original = load_adapter(tmp_path / "exported"), load_adapter(tmp_path / "col" / "adapter_0007")
    for target in original.lora_A:
        torch.testing.assert_close(exported.delta(target), original.delta(target), rtol=1e-4, atol=1e-5)

    # make-collection's targets at --hidden 32: q_proj 32→32, v_proj 32→8.
    write_planted(tmp_path / "more", small_spec(n=1, modules=(("q_proj", 32, 32), ("v_proj", 32, 8)), seed=99))
    added = kilolora("bank", "add", tmp_path / "bank", tmp_path / "more" / "adapter_0000", "--name", "newcomer")
    assert "newcomer" in added.stdout
    bank = Bank.load(tmp_path / "bank")
    assert bank.names[-1] == "newcomer" and len(bank.entries) == 61
    assert bank.entry("newcomer").source == "added"


def test_thousand_adapters_save_95_percent(tmp_path):
    kilolora("make-collection", "-o", tmp_path / "col", "--n", 1000, "--groups", 4, "--hidden", 128, "--layers", 2, "--r", 8, "--shared-rank", 8)
    summary = json.loads(kilolora("compress", tmp_path / "col", "-o", tmp_path / "bank", "--rank", 8, "--clusters", 4, "--json").stdout)
    assert summary["adapters"] == 1000 and summary["params_saved"] >= 0.95
    assert summary["rel_error_mean"] < 0.05  # noise 0.01 on top of planted rank-8 groups


# ------------------------------------------------------------------------ bad input


def _mismatched(tmp_path):
    write_planted(tmp_path / "in" / "a", small_spec(n=2))
    write_planted(tmp_path / "in" / "b", small_spec(n=2, modules=(("q_proj", 48, 48), ("v_proj", 48, 16)), seed=1))
    return [tmp_path / "in" / "a" / "adapter_0000", tmp_path / "in" / "b" / "adapter_0000"], "has shape"


def _corrupt(tmp_path):
    write_planted(tmp_path / "in", small_spec(n=3))
    f = tmp_path / "in" / "adapter_0001" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return [tmp_path / "in"], "corrupt safetensors"


def _nan(tmp_path):
    write_planted(tmp_path / "in", small_spec(n=3))
    f = tmp_path / "in" / "adapter_0002" / "adapter_model.safetensors"
    t = load_file(str(f))
    next(iter(t.values()))[0, 0] = float("inf")
    save_file(t, str(f))
    return [tmp_path / "in"], "NaN or Inf"


def _pickle(tmp_path):
    write_planted(tmp_path / "in", small_spec(n=2))
    d = tmp_path / "in" / "adapter_0000"
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"pickle")
    return [tmp_path / "in"], "adapter_model.bin: pickle weights are refused"


def _missing(tmp_path):
    return [tmp_path / "nowhere"], "adapter directory not found"


def _rank(tmp_path):
    write_planted(tmp_path / "in", small_spec(n=2))
    return [tmp_path / "in", "--rank", 17], "rank 17 is larger than target"


@pytest.mark.parametrize("make_bad", [_mismatched, _corrupt, _nan, _pickle, _missing, _rank])
def test_bad_input_one_clear_line_and_no_output(tmp_path, make_bad):
    args, message = make_bad(tmp_path)
    out = tmp_path / "out" / "bank"
    proc = kilolora("compress", *args, "-o", out, check=False)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kilolora: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_cuda_without_gpu_falls_back_to_cpu_with_a_warning(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    write_planted(tmp_path / "in", small_spec(n=3))
    proc = kilolora("compress", tmp_path / "in", "-o", tmp_path / "bank", "--rank", 4, "--device", "cuda")
    assert "kilolora: warning: device cuda was asked for but torch sees no CUDA device; running on cpu" in proc.stderr
    assert len(Bank.load(tmp_path / "bank").entries) == 3


def test_existing_output_is_not_overwritten_without_flag(tmp_path):
    write_planted(tmp_path / "in", small_spec(n=3))
    (tmp_path / "bank").mkdir()
    (tmp_path / "bank" / "keep.txt").write_text("mine")
    proc = kilolora("compress", tmp_path / "in", "-o", tmp_path / "bank", check=False)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr
    assert (tmp_path / "bank" / "keep.txt").read_text() == "mine"
    proc = kilolora("compress", tmp_path / "in", "-o", tmp_path / "bank", "--rank", 4, "--overwrite", check=False)
    assert proc.returncode == 1 and "not a kilolora bank" in proc.stderr  # --overwrite replaces banks only
    assert (tmp_path / "bank" / "keep.txt").read_text() == "mine"
    kilolora("compress", tmp_path / "in", "-o", tmp_path / "bank2", "--rank", 4)
    kilolora("compress", tmp_path / "in", "-o", tmp_path / "bank2", "--rank", 2, "--overwrite")
    assert Bank.load(tmp_path / "bank2").rank == 2


def test_bank_errors(tmp_path):
    proc = kilolora("bank", "info", tmp_path, check=False)
    assert proc.returncode == 1 and "not a kilolora bank" in proc.stderr
    write_planted(tmp_path / "in", small_spec(n=3))
    kilolora("compress", tmp_path / "in", "-o", tmp_path / "bank", "--rank", 4)
    proc = kilolora("bank", "export", tmp_path / "bank", "nobody", "-o", tmp_path / "x", check=False)
    assert proc.returncode == 1 and "no adapter named 'nobody'" in proc.stderr and not (tmp_path / "x").exists()
    proc = kilolora("bank", "add", tmp_path / "bank", tmp_path / "in" / "adapter_0001", check=False)
    assert proc.returncode == 1 and "already has an adapter named 'adapter_0001'" in proc.stderr
    shutil.rmtree(tmp_path / "in")
    assert len(Bank.load(tmp_path / "bank").entries) == 3  # failed commands changed nothing


def test_serve_and_chat_explain_themselves_and_refuse_bad_flags(tmp_path):
    out = kilolora("serve", "--help").stdout
    for flag in ("MODEL_DIR", "--bank", "--adapter", "--host", "--port", "--tool-format", "--torch-threads",
                 "--engine-thread"):
        assert flag in out
    out = kilolora("chat", "--help").stdout
    for flag in ("--url", "--adapter", "--turns", "--no-tools", "/trace"):
        assert flag in out
    for args, msg in [(["serve", "--port", "0"], "--port must be in 1..65535"),
                      (["serve", "--adapter", "novalue"], "--adapter takes NAME=DIR"),
                      (["serve", "--adapter", f"x={tmp_path / 'missing'}"], "is not a local directory"),
                      (["serve", str(tmp_path / "no_model")], "is not a local directory"),
                      (["serve", "--tool-format", "pythonic"], "invalid choice"),
                      (["serve", "--torch-threads", "0"], "--torch-threads must be >= 1"),
                      (["serve", "--engine", "vllm", "--torch-threads", "2"], "are for the kilolora engine"),
                      (["serve", "--engine", "vllm", "--engine-thread"], "are for the kilolora engine"),
                      (["chat", "--turns", "-1"], "--turns must be >= 0")]:
        p = kilolora(*args, check=False)
        assert p.returncode != 0 and msg in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
