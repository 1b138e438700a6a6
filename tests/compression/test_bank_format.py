"""The bank's on-disk format versions: version 2 is written, version 1 (`slots`, `<slot>.sigma`) is still read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compression import Bank, Collection, CompressConfig, LoraAdapter, compress
from compression.bank import FORMAT_VERSION, _sha256
from compression.synthetic import PlantedSpec, planted_factors



def small_bank(method: str) -> Bank:
    spec = PlantedSpec(n=6, modules=(("q_proj", 16, 16), ("v_proj", 16, 8)), layers=1, r=2, shared_rank=2, groups=2)
    As, Bs, _ = planted_factors(spec)
    cfg = {"r": spec.r, "lora_alpha": spec.r, "target_modules": ["q_proj", "v_proj"]}
    # one adapter adapts q_proj only, so the entries' target lists differ
    adapters = [LoraAdapter(f"a{i}", dict(cfg), dict(As[i]), dict(Bs[i])) for i in range(spec.n)]
    v = next(t for t in As[0] if t.endswith("v_proj"))
    del adapters[0].lora_A[v], adapters[0].lora_B[v]
    clusters = 2 if method != "svd" else 1
    return compress(Collection(adapters), CompressConfig(method=method, rank=2, clusters=clusters))


def write_version_1(src: Path, dst: Path) -> None:
    """The version-1 bank a kilolora before the rename wrote: `slots` keys and `<slot>.sigma` tensors."""
    dst.mkdir()
    tensors = {k.removesuffix(".cores") + ".sigma" if k.endswith(".cores") else k: v
               for k, v in load_file(str(src / "bank.safetensors")).items()}
    save_file(tensors, str(dst / "bank.safetensors"), metadata={"format": "kilolora.bank"})
    meta = json.loads((src / "bank.json").read_text())

    def rename(d: dict) -> dict:
        return {("slots" if k == "targets" else k): v for k, v in d.items()}

    old = {**rename(meta), "format_version": 1}
    old["adapters"] = [rename(e) for e in meta["adapters"]]
    old["stats"] = rename(meta["stats"])
    old["tensors_sha256"] = _sha256(dst / "bank.safetensors")
    (dst / "bank.json").write_text(json.dumps(old, indent=1))


def assert_banks_equal(a: Bank, b: Bank) -> None:
    for field in ("method", "rank", "targets", "entries", "base_model_name_or_path", "target_modules", "history", "dtype"):
        assert getattr(a, field) == getattr(b, field), field
    for field in ("U", "V", "cores"):
        x, y = getattr(a, field), getattr(b, field)
        assert list(x) == list(y), field
        for t in x:
            assert x[t].dtype == y[t].dtype and torch.equal(x[t], y[t]), f"{field}[{t}]"


@pytest.mark.parametrize("method", ["jd-full", "jd-diag", "svd"])
def test_a_version_1_bank_loads_and_equals_the_same_bank_saved_as_version_2(tmp_path, method):
    bank = small_bank(method)
    bank.save(tmp_path / "v2")
    write_version_1(tmp_path / "v2", tmp_path / "v1")
    v2_meta = json.loads((tmp_path / "v2" / "bank.json").read_text())
    v1_meta = json.loads((tmp_path / "v1" / "bank.json").read_text())
    # non-vacuous: the two directories hold the two formats
    assert v2_meta["format_version"] == FORMAT_VERSION == 2 and "targets" in v2_meta and "slots" not in v2_meta
    assert v1_meta["format_version"] == 1 and "slots" in v1_meta and "targets" not in v1_meta
    assert all("slots" in e and "targets" not in e for e in v1_meta["adapters"]) and "slots" in v1_meta["stats"]
    assert any(k.endswith(".cores") for k in load_file(str(tmp_path / "v2" / "bank.safetensors")))
    assert not any(k.endswith(".cores") for k in load_file(str(tmp_path / "v1" / "bank.safetensors")))
    assert len({len(e["targets"]) for e in v2_meta["adapters"]}) == 2

    old, new = Bank.load(tmp_path / "v1"), Bank.load(tmp_path / "v2")
    assert_banks_equal(old, new)
    assert_banks_equal(new, bank)
    assert old.stats() == new.stats() and old.stats()["targets"] == 2

    # Saved again, the version-1 bank is written as version 2: the very files `bank.save` wrote.
    old.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "bank.json").read_text()) == v2_meta
    assert (tmp_path / "again" / "bank.safetensors").read_bytes() == (tmp_path / "v2" / "bank.safetensors").read_bytes()


def test_a_version_1_bank_is_checked_in_its_own_names(tmp_path):
    small_bank("jd-full").save(tmp_path / "v2")
    write_version_1(tmp_path / "v2", tmp_path / "v1")
    # the sha256 is of the version-1 tensor file as written
    raw = bytearray((tmp_path / "v1" / "bank.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "v1" / "bank.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256 does not match"):
        Bank.load(tmp_path / "v1")
    # version-2 tensor names under a version-1 bank.json are refused, naming the version-1 layout
    shutil.copy(tmp_path / "v2" / "bank.safetensors", tmp_path / "v1" / "bank.safetensors")
    meta = json.loads((tmp_path / "v1" / "bank.json").read_text())
    meta["tensors_sha256"] = _sha256(tmp_path / "v1" / "bank.safetensors")
    (tmp_path / "v1" / "bank.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"unexpected tensor '.*q_proj\.cores'; a bank of format_version 1 holds "
                                         r"<target>\.U, \.V and \.sigma"):
        Bank.load(tmp_path / "v1")


@pytest.mark.parametrize("version, got", [(3, "3"), (0, "0"), ("2", '"2"'), (True, "true"), (2.0, "2.0"), ([1], r"\[1\]"),
                                          (None, "null"), ("missing", r"none \(the field is missing\)")])
def test_an_unknown_format_version_is_refused(tmp_path, version, got):
    small_bank("jd-full").save(tmp_path / "bank")
    path = tmp_path / "bank" / "bank.json"
    meta = json.loads(path.read_text())
    if version == "missing":
        del meta["format_version"]
    else:
        meta["format_version"] = version
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"bank\.json: unknown format_version; this kilolora reads 1 or 2, got {got} "
                                         r"\(a bank written by a newer kilolora needs that kilolora\)"):
        Bank.load(tmp_path / "bank")
