"""Clustering, the bank format, and the round trip through real `peft` models."""

from __future__ import annotations

import json
import os

import pytest
import torch

from compression import Bank, Collection, CompressConfig, LoraAdapter, compress, load_adapter, load_collection, save_adapter
from compression.compress import _enforce_min_size
from compression.synthetic import PlantedSpec, planted_factors
from tests.helpers import load_base, make_peft_adapter, peft_logits


def planted_collection(spec: PlantedSpec) -> tuple[Collection, list[int]]:
    As, Bs, groups = planted_factors(spec)
    cfg = {"r": spec.r, "lora_alpha": spec.r, "target_modules": ["q_proj", "v_proj"]}
    adapters = [LoraAdapter(f"a{i:03d}", dict(cfg), As[i], Bs[i]) for i in range(spec.n)]
    return Collection(adapters), groups


def dense_rel_errors(bank: Bank, collection: Collection) -> torch.Tensor:
    """Brute force: ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F per adapter over all targets, from dense matrices."""
    out = []
    for a in collection.adapters:
        recon = bank.reconstruct(a.name)
        num = sum((a.delta(s) - recon[s]).square().sum() for s in a.lora_A)
        den = sum(a.delta(s).square().sum() for s in a.lora_A)
        out.append((num / den).sqrt())
    return torch.stack(out)


# ----------------------------------------------------------------------------- clusters

SPEC3 = PlantedSpec(n=30, modules=(("q_proj", 40, 40), ("v_proj", 40, 20)), layers=2, r=4, shared_rank=4, groups=3, noise=0.01)


def purity(assign: list[int], truth: list[int]) -> float:
    hits = 0
    for k in set(assign):
        members = [t for a, t in zip(assign, truth) if a == k]
        hits += max(members.count(t) for t in set(members))
    return hits / len(truth)


@pytest.mark.parametrize("method", ["jd-full", "jd-diag"])
def test_clustering_recovers_planted_groups(method):
    col, truth = planted_collection(SPEC3)
    rank = 4 if method == "jd-full" else 12
    one = compress(col, CompressConfig(method=method, rank=rank, clusters=1))
    three = compress(col, CompressConfig(method=method, rank=rank, clusters=3, seed=1))
    assign = [e.cluster for e in three.entries]
    assert purity(assign, truth) == 1.0
    assert sorted(three.stats()["cluster_sizes"]) == [10, 10, 10]
    assert three.stats()["rel_error_mean"] < 0.5 * one.stats()["rel_error_mean"]
    # The reported errors are the true (dense) ones.
    torch.testing.assert_close(
        torch.tensor([e.rel_error for e in three.entries]), dense_rel_errors(three, col), rtol=1e-3, atol=1e-4
    )


def test_same_seed_same_bank_and_clusters_are_deterministic():
    col, _ = planted_collection(SPEC3)
    cfg = CompressConfig(method="jd-full", rank=4, clusters=3, seed=7)
    a, b = compress(col, cfg), compress(col, cfg)
    for s in a.U:
        assert torch.equal(a.U[s], b.U[s]) and torch.equal(a.cores[s], b.cores[s])
    assert [e.cluster for e in a.entries] == [e.cluster for e in b.entries]


def test_empty_clusters_are_refilled():
    err = torch.tensor([[0.0, 5.0, 5.0], [1.0, 5.0, 5.0], [4.0, 5.0, 5.0], [0.5, 0.1, 5.0]])
    assign = _enforce_min_size(torch.tensor([0, 0, 0, 1]), err, 3)
    assert sorted(torch.bincount(assign, minlength=3).tolist()) == [1, 1, 2]
    assert assign[2] == 2  # the adapter its cluster served worst moved to the empty one
    assert assign[3] == 1  # a singleton is never emptied


def test_one_cluster_per_adapter_is_exact():
    col, _ = planted_collection(PlantedSpec(n=5, modules=(("q_proj", 24, 24),), layers=1, r=3, shared_rank=3, groups=5))
    bank = compress(col, CompressConfig(method="jd-full", rank=3, clusters=5))
    assert sorted(e.cluster for e in bank.entries) == [0, 1, 2, 3, 4]
    assert dense_rel_errors(bank, col).max() < 1e-5


def test_config_validation():
    col, _ = planted_collection(PlantedSpec(n=4, modules=(("q_proj", 16, 8),), layers=1, r=2))
    for cfg, match in [
        (CompressConfig(rank=9), "rank 9 is larger than target .* allows"),
        (CompressConfig(rank=0), "rank must be"),
        (CompressConfig(rank=2, clusters=5), "clusters must be between 1 and"),
        (CompressConfig(rank=2, method="svd", clusters=2), "svd keeps one basis per adapter"),
        (CompressConfig(rank=2, method="pca"), "method must be one of"),
        (CompressConfig(rank=2, device="tpu"), "device must be"),
        (CompressConfig(rank=2, iters=-1), "iters must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            compress(col, cfg)


# -------------------------------------------------------------------------------- bank


def test_stats_count_parameters_and_savings():
    spec = PlantedSpec(n=50, modules=(("q_proj", 64, 64), ("v_proj", 64, 16)), layers=2, r=8, shared_rank=8)
    col, _ = planted_collection(spec)
    bank = compress(col, CompressConfig(method="jd-full", rank=8))
    s = bank.stats()
    before = spec.n * spec.layers * spec.r * ((64 + 64) + (64 + 16))
    after = spec.layers * (8 * (64 + 64) + 8 * (64 + 16)) + spec.n * 2 * spec.layers * 8 * 8
    assert (s["params_before"], s["params_after"]) == (before, after)
    assert s["params_saved"] == pytest.approx(1 - after / before)
    assert s["bytes_before"] == 4 * before and s["bytes_after"] == 4 * after
    assert s["rel_error_max"] < 1e-4  # planted at rank 8, no noise


def test_half_precision_adapters_make_a_half_precision_bank(tmp_path):
    col, _ = planted_collection(PlantedSpec(n=6, modules=(("q_proj", 32, 32),), layers=1, r=4, shared_rank=4))
    for a in col.adapters:
        save_adapter(tmp_path / "in" / a.name, a.lora_A, a.lora_B, {"target_modules": ["q_proj"]}, dtype=torch.bfloat16)
    loaded = load_collection([tmp_path / "in"])
    bank = compress(loaded, CompressConfig(rank=4))
    assert bank.dtype == "bfloat16" and bank.stats()["bytes_before"] == 2 * bank.stats()["params_before"]
    bank.save(tmp_path / "bank")
    assert Bank.load(tmp_path / "bank").U[col.targets[0].name].dtype == torch.bfloat16
    # Rounding to bf16 (inputs and bank) costs bf16 precision, and the reported errors are
    # those of the bank as stored: the dense check reconstructs from the saved bf16 tensors.
    assert 1e-4 < bank.stats()["rel_error_max"] < 2e-2
    stored = Bank.load(tmp_path / "bank")
    torch.testing.assert_close(
        torch.tensor([e.rel_error for e in stored.entries]), dense_rel_errors(stored, loaded), rtol=1e-3, atol=1e-6
    )


def test_save_load_roundtrip_and_checksum(tmp_path):
    col, _ = planted_collection(SPEC3)
    bank = compress(col, CompressConfig(method="jd-full", rank=4, clusters=3))
    bank.save(tmp_path / "bank")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    back = Bank.load(tmp_path / "bank")
    assert back.names == bank.names and back.stats() == bank.stats()
    for s in bank.U:
        assert torch.equal(back.U[s], bank.U[s]) and torch.equal(back.cores[s], bank.cores[s])
    meta = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert meta["format_version"] == 2 and meta["method"] == "jd-full" and meta["num_clusters"] == 3
    assert meta["adapters"][0]["name"] == "a000" and "rel_error" in meta["adapters"][0]
    with pytest.raises(ValueError, match="already exists"):
        bank.save(tmp_path / "bank")
    raw = bytearray((tmp_path / "bank" / "bank.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "bank" / "bank.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256 does not match"):
        Bank.load(tmp_path / "bank")


def test_reconstruct_and_export_are_u_core_v(tmp_path):
    col, _ = planted_collection(SPEC3)
    bank = compress(col, CompressConfig(method="jd-diag", rank=6, clusters=3))
    e = bank.entries[4]
    for s in bank.U:
        U, V, core = bank.U[s][e.cluster], bank.V[s][e.cluster], bank.cores[s][e.index]
        torch.testing.assert_close(bank.reconstruct(e.name)[s], U @ torch.diag(core) @ V.T)
    exported = load_adapter(bank.export(e.name, tmp_path / "exp"))
    for s, w in bank.reconstruct(e.name).items():
        torch.testing.assert_close(exported.delta(s), w, rtol=1e-5, atol=1e-6)


def test_add_projects_onto_the_best_cluster():
    spec = PlantedSpec(n=31, modules=SPEC3.modules, layers=2, r=4, shared_rank=4, groups=3, noise=0.0)
    full, truth = planted_collection(spec)
    col = Collection(full.adapters[:30])
    bank = compress(col, CompressConfig(method="jd-full", rank=4, clusters=3))
    newcomer = full.adapters[30]
    entry = bank.add(newcomer, name="late")
    mates = [e.cluster for e, t in zip(bank.entries[:30], truth[:30]) if t == truth[30]]
    assert entry.cluster == mates[0] and entry.index == 30 and entry.source == "added"
    assert entry.rel_error < 1e-4  # it lies in its group's planted span
    for s, w in bank.reconstruct("late").items():
        U, V = bank.U[s][entry.cluster], bank.V[s][entry.cluster]
        torch.testing.assert_close(bank.cores[s][30], U.T @ newcomer.delta(s) @ V, rtol=1e-4, atol=1e-5)
    # An adapter from outside every group is added too, with its (large) error recorded.
    g = torch.Generator().manual_seed(9)
    stranger = LoraAdapter(
        "stranger",
        {"r": 4},
        {s: torch.randn(4, a.shape[1], generator=g) for s, a in newcomer.lora_A.items()},
        {s: torch.randn(b.shape[0], 4, generator=g) for s, b in newcomer.lora_B.items()},
    )
    assert bank.add(stranger).rel_error > 0.5
    with pytest.raises(ValueError, match="already has an adapter named 'late'"):
        bank.add(newcomer, name="late")


def test_add_to_svd_bank_gets_its_own_basis():
    col, _ = planted_collection(PlantedSpec(n=4, modules=(("q_proj", 20, 20),), layers=1, r=3, shared_rank=3, groups=4))
    bank = compress(Collection(col.adapters[:3]), CompressConfig(method="svd", rank=3))
    entry = bank.add(col.adapters[3])
    assert bank.num_clusters == 4 and entry.cluster == 3 and entry.rel_error < 1e-5
    bank.check()


def test_add_rejects_mismatched_targets():
    col, _ = planted_collection(PlantedSpec(n=3, modules=(("q_proj", 20, 20),), layers=1, r=2))
    bank = compress(col, CompressConfig(rank=2))
    other, _ = planted_collection(PlantedSpec(n=1, modules=(("q_proj", 20, 10),), layers=1, r=2))
    with pytest.raises(ValueError, match=r"has shape \(out=10, in=20\) but the bank has \(out=20, in=20\)"):
        bank.add(other.adapters[0], name="x")
    extra, _ = planted_collection(PlantedSpec(n=1, modules=(("k_proj", 20, 20),), layers=1, r=2))
    with pytest.raises(ValueError, match="no basis for"):
        bank.add(extra.adapters[0], name="y")


# ----------------------------------------------------------------- round trip through peft


def test_peft_roundtrip_at_full_rank(tiny_llama_dir, tmp_path):
    """peft adapters → compress at full rank → export → PeftModel logits equal the originals."""
    specs = {
        "plain": dict(r=2, lora_alpha=4),
        "rslora": dict(r=4, lora_alpha=16, use_rslora=True),
        "qkv": dict(r=3, lora_alpha=3, target_modules=["q_proj", "k_proj", "v_proj"]),
        "activated": dict(r=2, lora_alpha=8, alora_invocation_tokens=[5, 6]),
    }
    src = tmp_path / "adapters"
    for i, (name, kw) in enumerate(specs.items()):
        make_peft_adapter(tiny_llama_dir, src / name, seed=10 + i, **kw)
    col = load_collection([src])
    total_rank = sum(kw["r"] for kw in specs.values())  # 11 <= min(out, in) = 16 of v_proj
    bank = compress(col, CompressConfig(method="jd-full", rank=total_rank))
    assert bank.stats()["rel_error_max"] < 1e-5
    bank.save(tmp_path / "bank")
    bank = Bank.load(tmp_path / "bank")

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        base = load_base(tiny_llama_dir)(input_ids=ids).logits
    for name in specs:
        out = bank.export(name, tmp_path / "exported" / name)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == total_rank and cfg["lora_alpha"] == total_rank and cfg["use_rslora"] is False
        original = peft_logits(tiny_llama_dir, src / name, ids)
        restored = peft_logits(tiny_llama_dir, out, ids)
        assert (original - base).abs().max() > 1e-3  # the adapter changes the output
        torch.testing.assert_close(restored, original, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "exported" / "activated" / "adapter_config.json").read_text())[
        "alora_invocation_tokens"
    ] == [5, 6]
    # The activated adapter leaves the tokens before its invocation untouched, exported or not.
    restored = peft_logits(tiny_llama_dir, tmp_path / "exported" / "activated", ids)
    torch.testing.assert_close(restored[:, :4], base[:, :4])


# ------------------------------------------------------------------ hardening: values, fields, swaps


def small_bank(tmp_path, name="bank", rank=4) -> Bank:
    col, _ = planted_collection(PlantedSpec(n=4, modules=(("q_proj", 16, 16),), layers=1, r=2, shared_rank=2, groups=2))
    bank = compress(col, CompressConfig(rank=rank))
    bank.save(tmp_path / name)
    return bank


def _rewrite_sha(bank_dir):
    from compression.bank import _sha256

    meta = json.loads((bank_dir / "bank.json").read_text())
    meta["tensors_sha256"] = _sha256(bank_dir / "bank.safetensors")
    (bank_dir / "bank.json").write_text(json.dumps(meta))


def test_load_refuses_nan_even_when_the_sha_matches(tmp_path):
    from safetensors.torch import load_file, save_file

    small_bank(tmp_path)
    f = tmp_path / "bank" / "bank.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if k.endswith(".cores"))
    tensors[key][1, 0, 0] = float("nan")
    save_file(tensors, str(f), metadata={"format": "kilolora.bank"})
    _rewrite_sha(tmp_path / "bank")
    with pytest.raises(ValueError, match=rf"tensor '{key}' has NaN or Inf values"):
        Bank.load(tmp_path / "bank")


def test_compress_and_save_refuse_non_finite_tensors(tmp_path, monkeypatch):
    from compression import jd

    col, _ = planted_collection(PlantedSpec(n=4, modules=(("q_proj", 16, 16),), layers=1, r=2, shared_rank=2, groups=2))
    fit = jd.FITS["jd-full"]

    def nan_fit(*args, **kw):
        out = fit(*args, **kw)
        out.cores[0, 0, 0] = float("nan")
        return out

    monkeypatch.setitem(jd.FITS, "jd-full", nan_fit)
    with pytest.raises(ValueError, match=r"the fit produced NaN or Inf values in bank tensor .*q_proj\.cores \(as float32\)"):
        compress(col, CompressConfig(rank=2))
    monkeypatch.undo()

    # Finite in float32, beyond float16's range (65504) once stored: refused before anything is written.
    big = Collection([LoraAdapter(a.name, a.config, {s: 1000 * x for s, x in a.lora_A.items()},
                                  {s: 1000 * x for s, x in a.lora_B.items()}) for a in col.adapters])
    assert max(float(big.adapters[0].delta(s).abs().max()) for s in big.adapters[0].lora_A) > 65504
    with pytest.raises(ValueError, match=r"NaN or Inf values in bank tensor .*\(as float16\); values beyond float16's range"):
        compress(big, CompressConfig(rank=2, dtype="float16"))
    bank = compress(big, CompressConfig(rank=2))
    bank.dtype = "float16"
    with pytest.raises(ValueError, match=r"bank tensor .* has NaN or Inf values \(as float16\); nothing was written"):
        bank.save(tmp_path / "half")
    assert not list(tmp_path.iterdir())


def _meta_edit(edit):
    def apply(meta):
        edit(meta)
        return meta

    return apply


BAD_META = {
    "a list": (lambda meta: [meta], r"bank\.json: expected a JSON object, got a list"),
    "no targets": (_meta_edit(lambda m: m.pop("targets")), r"bank\.json: missing field 'targets'"),
    "rank a string": (_meta_edit(lambda m: m.update(rank="4")), r"bank\.json: rank must be an integer; got \"4\""),
    "dtype float64": (_meta_edit(lambda m: m.update(dtype="float64")),
                      r"bank\.json: dtype must be one of float32, float16, bfloat16; got 'float64'"),
    "method pca": (_meta_edit(lambda m: m.update(method="pca")), r"method must be one of jd-full, jd-diag, svd; got 'pca'"),
    "unknown entry field": (_meta_edit(lambda m: m["adapters"][1].update(colour="red")),
                            r"bank\.json: adapters\[1\]: unknown field 'colour'; expected name, index, cluster"),
    "missing entry field": (_meta_edit(lambda m: m["adapters"][2].pop("r")), r"bank\.json: adapters\[2\]: missing field 'r'"),
    "entry index a string": (_meta_edit(lambda m: m["adapters"][0].update(index="0")),
                             r"adapters\[0\]: index must be an integer; got \"0\""),
    "entry targets": (_meta_edit(lambda m: m["adapters"][0].update(targets="q_proj")),
                      r"adapters\[0\]: targets must be a list of strings; got \"q_proj\""),
    "entry not an object": (_meta_edit(lambda m: m["adapters"].__setitem__(0, 7)), r"adapters\[0\]: expected an object, got a number"),
    "target field": (_meta_edit(lambda m: m["targets"][0].update(in_features=16.5)),
                     r"targets\[0\]: in_features must be an integer; got 16.5"),
    "unknown target in entry": (_meta_edit(lambda m: m["adapters"][0]["targets"].append("nowhere")),
                                r"bank entry 'a000' adapts target 'nowhere', which the bank has no basis for"),
    "duplicate names": (_meta_edit(lambda m: m["adapters"][3].update(name="a001")),
                        r"the bank lists adapter 'a001' twice; adapter names must be unique"),
}


@pytest.mark.parametrize("case", BAD_META)
def test_bank_json_fields_are_checked_by_name(tmp_path, case):
    edit, message = BAD_META[case]
    small_bank(tmp_path)
    meta_path = tmp_path / "bank" / "bank.json"
    meta_path.write_text(json.dumps(edit(json.loads(meta_path.read_text()))))
    with pytest.raises(ValueError, match=message):
        Bank.load(tmp_path / "bank")


def test_bank_tensors_must_match_bank_json(tmp_path):
    from safetensors.torch import load_file, save_file

    small_bank(tmp_path)
    f = tmp_path / "bank" / "bank.safetensors"
    tensors = load_file(str(f))
    save_file({**tensors, "extra.U": torch.zeros(1)}, str(f))
    _rewrite_sha(tmp_path / "bank")
    with pytest.raises(ValueError, match=r"unexpected tensor 'extra\.U'"):
        Bank.load(tmp_path / "bank")
    save_file({k: v.double() for k, v in tensors.items()}, str(f))
    _rewrite_sha(tmp_path / "bank")
    with pytest.raises(ValueError, match=r"has dtype float64; bank\.json says float32"):
        Bank.load(tmp_path / "bank")


def test_overwrite_replaces_only_a_bank(tmp_path):
    bank = small_bank(tmp_path)
    (tmp_path / "file").write_text("mine")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep.txt").write_text("mine")
    for target in ("file", "dir"):
        with pytest.raises(ValueError, match=rf"refusing to overwrite .*{target}: it is not a kilolora bank"):
            bank.save(tmp_path / target, overwrite=True)
    assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "dir" / "keep.txt").read_text() == "mine"
    other = small_bank(tmp_path, "other", rank=2)
    other.save(tmp_path / "bank", overwrite=True)
    assert Bank.load(tmp_path / "bank").rank == 2 != bank.rank
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_killed_between_the_renames_leaves_a_bank(tmp_path, monkeypatch):
    small_bank(tmp_path, rank=4)
    new = small_bank(tmp_path, "new", rank=2)
    calls = []

    def dies_after_the_first(src, dst):  # the process "dies" after moving the old bank aside
        calls.append((src, dst))
        if len(calls) > 1:
            raise OSError(5, "killed")
        return real(src, dst)

    real = os.replace
    monkeypatch.setattr(os, "replace", dies_after_the_first)
    monkeypatch.setattr(os, "rename", dies_after_the_first)
    with pytest.raises(OSError, match="killed"):
        new.save(tmp_path / "bank", overwrite=True)
    monkeypatch.undo()
    assert not (tmp_path / "bank").exists()  # the kill left the old bank in its backup ...
    assert Bank.load(tmp_path / "bank").rank == 4  # ... and the next start puts it back
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir either
    new.save(tmp_path / "bank", overwrite=True)
    assert Bank.load(tmp_path / "bank").rank == 2


def test_a_stale_backup_after_a_finished_swap_is_dropped(tmp_path):
    import shutil

    bank = small_bank(tmp_path)
    shutil.copytree(tmp_path / "bank", tmp_path / ".bank.kilolora-old")  # killed before deleting the old bank
    Bank.load(tmp_path / "bank")
    assert not (tmp_path / ".bank.kilolora-old").exists()
    shutil.copytree(tmp_path / "bank", tmp_path / ".bank.kilolora-old")
    bank.save(tmp_path / "bank", overwrite=True)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_save_leaves_no_temp_dir_and_the_old_bank(tmp_path, monkeypatch):
    import compression.bank

    bank = small_bank(tmp_path)

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(compression.bank, "save_file", interrupted)
    for overwrite, target in ((True, "bank"), (False, "fresh")):
        with pytest.raises(KeyboardInterrupt):
            bank.save(tmp_path / target, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]
    monkeypatch.undo()
    assert Bank.load(tmp_path / "bank").names == bank.names


def test_long_output_names_are_refused_before_writing(tmp_path):
    bank = small_bank(tmp_path)
    with pytest.raises(ValueError, match=r"output name a{32}\.\.\. is 300 bytes long; at most 230 are supported"):
        bank.save(tmp_path / ("a" * 300))
    with pytest.raises(ValueError, match="is 300 bytes long"):
        bank.export("a000", tmp_path / ("a" * 300))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]
