"""`kilolora compress` and `kilolora bank ...` on hostile input: real subprocesses, real files.

Every refusal is exit code 1 and exactly one `kilolora: error: ...` line that says what was
expected, never a traceback, and nothing at `-o` is deleted unless it is a bank.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from compression import Bank
from compression.bank import _sha256
from compression.synthetic import write_planted
from tests.orchestrator.test_cli import kilolora, small_spec


def one_error(proc) -> str:
    """The single `kilolora: error:` line of a failed run (asserting there is one and no traceback)."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kilolora: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def hidden(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A planted collection of 3 adapters (`in/adapter_000i`) and a rank-4 bank of it (`bank`)."""
    root = tmp_path_factory.mktemp("made")
    write_planted(root / "in", small_spec(n=3))
    kilolora("compress", root / "in", "-o", root / "bank", "--rank", 4)
    return root


# --------------------------------------------------------------- 1. non-finite values


def _alpha_1e308(d: Path):
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 1e308}))
    return "lora_alpha must be a number in (0, 1e+06]; got 1e+308"


def _weights_1e38(d: Path):
    f = d / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key].fill_(1e38)  # finite in float32; ΔW = B A and its squares are not
    save_file(tensors, str(f))
    return "could overflow float32"


def _rank_lies(d: Path):
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 5}))  # the tensors have rank 4
    return "has rank 4 (lora_A (4, 32), lora_B (32, 4)) but adapter_config.json gives it r = 5"


@pytest.mark.parametrize("spoil", [_alpha_1e308, _weights_1e38, _rank_lies])
def test_compress_refuses_values_that_would_make_a_nan_bank(made, tmp_path, spoil):
    shutil.copytree(made / "in", tmp_path / "in")
    message = spoil(tmp_path / "in" / "adapter_0001")
    line = one_error(kilolora("compress", tmp_path / "in", "-o", tmp_path / "out", "--rank", 4, check=False))
    assert message in line and "adapter_0001" in line, line
    assert not (tmp_path / "out").exists() and not hidden(tmp_path)


def test_bank_add_refuses_an_overflowing_adapter(made, tmp_path):
    shutil.copytree(made / "bank", tmp_path / "bank")
    shutil.copytree(made / "in" / "adapter_0000", tmp_path / "new")
    _weights_1e38(tmp_path / "new")
    assert "could overflow float32" in one_error(kilolora("bank", "add", tmp_path / "bank", tmp_path / "new", "-n", "x", check=False))
    assert Bank.load(tmp_path / "bank").names == Bank.load(made / "bank").names


def test_bank_info_refuses_nan_tensors_with_a_recomputed_sha(made, tmp_path):
    shutil.copytree(made / "bank", tmp_path / "bank")
    f = tmp_path / "bank" / "bank.safetensors"
    tensors = load_file(str(f))
    key = sorted(k for k in tensors if k.endswith(".U"))[0]
    tensors[key][0, 0, 0] = float("inf")
    save_file(tensors, str(f))
    meta = json.loads((tmp_path / "bank" / "bank.json").read_text())
    (tmp_path / "bank" / "bank.json").write_text(json.dumps({**meta, "tensors_sha256": _sha256(f)}))
    for args in (["info"], ["export", "adapter_0000", "-o", tmp_path / "x"]):
        line = one_error(kilolora("bank", args[0], tmp_path / "bank", *args[1:], check=False))
        assert f"tensor '{key}' has NaN or Inf values" in line
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------ 3. --overwrite


def _plain_file(root: Path) -> Path:
    (root / "file.txt").write_text("mine")
    return root / "file.txt"


def _other_dir(root: Path) -> Path:
    (root / "notes").mkdir()
    (root / "notes" / "keep.txt").write_text("mine")
    return root / "notes"


def _the_collection(root: Path) -> Path:
    return root / "in"


def _an_input_adapter(root: Path) -> Path:
    return root / "in" / "adapter_0001"


@pytest.mark.parametrize(
    "target, message",
    [(_plain_file, "it is not a kilolora bank (no bank.json); overwrite only replaces a bank"),
     (_other_dir, "it is not a kilolora bank"),
     (_the_collection, "it is not a kilolora bank"),
     (_an_input_adapter, "it is not a kilolora bank")],
)
def test_overwrite_never_deletes_what_is_not_a_bank(made, tmp_path, target, message):
    shutil.copytree(made / "in", tmp_path / "in")
    out = target(tmp_path)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    line = one_error(kilolora("compress", tmp_path / "in", "-o", out, "--rank", 4, "--overwrite", check=False))
    assert message in line, line
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_output_may_not_hold_or_lie_inside_an_input(made, tmp_path):
    shutil.copytree(made / "in", tmp_path / "in")
    inside = tmp_path / "in" / "adapter_0002" / "bank"
    line = one_error(kilolora("compress", tmp_path / "in", "-o", inside, "--rank", 4, check=False))
    assert "is inside the input adapter directory" in line and "adapter_0002" in line
    # A bank placed around the inputs (here: copied in) is not replaced either: that would delete them.
    shutil.copy(made / "bank" / "bank.json", tmp_path / "in")
    line = one_error(kilolora("compress", tmp_path / "in" / "adapter_0000", "-o", tmp_path / "in", "--rank", 4, "--overwrite", check=False))
    assert "contains the input adapter directory" in line
    assert len(list((tmp_path / "in").glob("adapter_*/adapter_model.safetensors"))) == 3 and not inside.exists()


def test_overwrite_help_says_only_a_bank_is_replaced():
    out = " ".join(kilolora("compress", "--help").stdout.split())
    assert "replace OUT if it is an existing bank (a directory with bank.json)" in out
    assert "never an input adapter directory" in out


def test_overwrite_killed_between_renames_leaves_a_bank(made, tmp_path, monkeypatch):
    """In process: `os.replace`/`os.rename` fail after the first call, as if the process died there."""
    from orchestrator.cli import main

    shutil.copytree(made / "bank", tmp_path / "bank")
    calls = []
    real = os.replace

    def dies_after_the_first(src, dst):
        calls.append(dst)
        if len(calls) > 1:
            raise OSError(5, "Input/output error", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", dies_after_the_first)
    monkeypatch.setattr(os, "rename", dies_after_the_first)
    assert main(["compress", str(made / "in"), "-o", str(tmp_path / "bank"), "--rank", "2", "--overwrite"]) == 1
    monkeypatch.undo()
    assert len(calls) >= 2
    info = json.loads(kilolora("bank", "info", tmp_path / "bank", "--json").stdout)  # recovered on start
    assert info["rank"] == 4 and info["adapters"] == 3
    assert not hidden(tmp_path)
    kilolora("compress", made / "in", "-o", tmp_path / "bank", "--rank", 2, "--overwrite")
    assert Bank.load(tmp_path / "bank").rank == 2 and not hidden(tmp_path)


def test_interrupted_compress_leaves_no_temp_dir(made, tmp_path, monkeypatch):
    import compression.bank
    from orchestrator.cli import main

    shutil.copytree(made / "bank", tmp_path / "bank")

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(compression.bank, "save_file", interrupted)
    assert main(["compress", str(made / "in"), "-o", str(tmp_path / "bank"), "--rank", "2", "--overwrite"]) == 130
    assert main(["compress", str(made / "in"), "-o", str(tmp_path / "fresh"), "--rank", "2"]) == 130
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]
    assert Bank.load(tmp_path / "bank").rank == 4


# ------------------------------------------------- 4. bank.json and file-system errors


def _edit(fn):
    def apply(meta):
        fn(meta)
        return meta

    return apply


BAD_BANK_JSON = {
    "a list": (lambda m: [m], "bank.json: expected a JSON object, got a list"),
    "no targets": (_edit(lambda m: m.pop("targets")), "bank.json: missing field 'targets'"),
    "unknown entry field": (_edit(lambda m: m["adapters"][0].update(owner="me")), "adapters[0]: unknown field 'owner'; expected name,"),
    "missing entry field": (_edit(lambda m: m["adapters"][1].pop("cluster")), "adapters[1]: missing field 'cluster'"),
    "wrong type": (_edit(lambda m: m["adapters"][2].update(lora_alpha="8")), "adapters[2]: lora_alpha must be a finite number; got \"8\""),
    "dtype": (_edit(lambda m: m.update(dtype="float64")), "dtype must be one of float32, float16, bfloat16; got 'float64'"),
    "duplicate names": (_edit(lambda m: m["adapters"][2].update(name="adapter_0000")), "lists adapter 'adapter_0000' twice"),
}


@pytest.mark.parametrize("case", BAD_BANK_JSON)
def test_bank_commands_explain_a_bad_bank_json_in_one_line(made, tmp_path, case):
    edit, message = BAD_BANK_JSON[case]
    shutil.copytree(made / "bank", tmp_path / "bank")
    meta_path = tmp_path / "bank" / "bank.json"
    meta_path.write_text(json.dumps(edit(json.loads(meta_path.read_text()))))
    commands = [["info"], ["export", "adapter_0001", "-o", tmp_path / "x"], ["add", made / "in" / "adapter_0000", "-n", "y"]]
    for args in commands if case in ("a list", "wrong type") else commands[:1]:
        line = one_error(kilolora("bank", args[0], tmp_path / "bank", *args[1:], check=False))
        assert message in line, (args, line)
    assert not (tmp_path / "x").exists() and meta_path.read_text() != ""


def test_names_too_long_for_the_file_system(made, tmp_path):
    long = tmp_path / ("b" * 300)
    assert "is 300 bytes long; at most 230 are supported" in one_error(
        kilolora("compress", made / "in", "-o", long, "--rank", 4, check=False))
    assert "is 300 bytes long" in one_error(kilolora("bank", "export", made / "bank", "adapter_0000", "-o", long, check=False))
    assert "File name too long" in one_error(kilolora("bank", "info", long, check=False))
    assert "File name too long" in one_error(kilolora("bank", "add", made / "bank", long, check=False))
    assert "File name too long" in one_error(kilolora("compress", long / "x", "-o", tmp_path / "o", check=False))
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------- 5. duplicate names


def test_compress_refuses_inputs_that_get_the_same_name(made, tmp_path):
    a = made / "in" / "adapter_0000"
    line = one_error(kilolora("compress", a, made / "in" / "." / "adapter_0000", "-o", tmp_path / "o", check=False))
    assert "adapter_0000 is given twice" in line
    shutil.copytree(a, tmp_path / "x")
    shutil.copytree(a, tmp_path / "x" / "x")  # an adapter directory nested in one of the same name
    line = one_error(kilolora("compress", tmp_path / "x", tmp_path / "x" / "x", "-o", tmp_path / "o", check=False))
    assert "two adapters are named 'x'" in line
    assert not (tmp_path / "o").exists()


def test_bank_add_refuses_an_existing_name(made, tmp_path):
    shutil.copytree(made / "bank", tmp_path / "bank")
    line = one_error(kilolora("bank", "add", tmp_path / "bank", made / "in" / "adapter_0002", "-n", "adapter_0001", check=False))
    assert "the bank already has an adapter named 'adapter_0001'" in line
    assert Bank.load(tmp_path / "bank").names == ["adapter_0000", "adapter_0001", "adapter_0002"]
