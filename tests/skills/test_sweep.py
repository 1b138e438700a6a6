"""`kilolora world sweep` on the quick world: a real CLI run writes sweep.json and two PNGs; an
svd bank at the adapters' own rank reproduces the uncompressed adapters output for output; a
rerun reuses what is done; the choice and the knee on hand-made rows; the CLI's errors."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from orchestrator.cli import main
from skills.sweep import COLORS, Candidate, candidates, choose, knee, parse_grid, plot, sweep
from tests.orchestrator.test_cli import kilolora

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def swept(quick_world, tmp_path_factory):
    """A three-candidate sweep through the CLI: svd at the adapters' rank (exact), a crude
    jd-diag and a jd-full asking for more clusters than there are adapters."""
    r = quick_world.manifest["build"]["r"]
    out = tmp_path_factory.mktemp("sweep")
    grid = f"svd:{r}:1,jd-diag:1:1,jd-full:2:{len(quick_world.tasks) + 2}"
    proc = kilolora("world", "sweep", "--world", quick_world.path, "--grid", grid, "--per-task", 2,
                    "--dtype", "float32", "--out", out)
    return out, proc, json.loads((out / "sweep.json").read_text())


def test_cli_writes_rows_choice_knee_and_two_plots(swept, quick_world):
    out, proc, res = swept
    n = len(quick_world.tasks)
    assert res["complete"] and res["settings"]["split"] == "train" and res["adapters"] == n
    assert [(x["method"], x["rank"], x["clusters"]) for x in res["rows"]] == [
        ("svd", quick_world.manifest["build"]["r"], 1), ("jd-diag", 1, 1), ("jd-full", 2, n)]  # clusters capped at n
    for x in res["rows"]:
        for k in ("params_after", "params_saved", "rel_error_mean", "rel_error_max", "accuracy", "normalised_score",
                  "normalised_task", "normalised_verifier", "verifier_auroc", "verifier_auroc_uncompressed",
                  "auroc_drop", "fit_iterations_mean", "compress_s", "eval_s", "agreement"):
            assert k in x, k
        assert x["reused"] is False and x["compress_s"] >= 0 and x["eval_s"] > 0
    assert res["rows"][1]["params_saved"] > res["rows"][2]["params_saved"] > res["rows"][0]["params_saved"]
    assert {"meets_targets", "reason", "index"} <= res["choice"].keys() and "summary" in res["knee"]
    assert "choice (*)" in proc.stdout and "knee:" in proc.stdout and "sweep_saved.png" in proc.stdout
    assert "Traceback" not in proc.stderr and not list(out.glob(".bank-*"))  # temp banks removed
    for name in ("sweep_saved.png", "sweep_error.png"):
        png = (out / name).read_bytes()
        assert png[:8] == PNG_MAGIC and 5_000 < len(png) < 150_000, (name, len(png))
        img = _image(out / name)
        assert img.shape[:2] == (480, 750) and (img[..., :3] < 0.9).mean() > 0.01  # axes, labels, text drawn


def test_svd_at_the_adapters_rank_reproduces_them_item_for_item(swept):
    _, _, res = swept
    svd, crude = res["rows"][0], res["rows"][1]
    ref = res["reference"]
    # non-vacuous: the adapters change the base's outputs, and a rank-1 bank does not reproduce them
    assert ref["base_agreement"] < 1
    assert crude["rel_error_mean"] > 0.1 and crude["agreement"] < 1
    assert svd["rel_error_mean"] < 1e-3 and svd["rel_error_max"] < 1e-3
    assert svd["agreement"] == 1.0  # every output equals the uncompressed adapter's
    assert svd["accuracy"] == ref["accuracy"]["uncompressed"]
    if svd["normalised_score"] is not None:  # None where the quick world's adapters do not beat the base
        assert svd["normalised_score"] == pytest.approx(1.0)
    assert svd["verifier_auroc"] == ref["verifier_auroc"].get("uncompressed")


def test_a_rerun_reuses_finished_candidates_and_other_settings_start_afresh(swept, quick_world, tmp_path):
    src, _, first = swept
    out = tmp_path / "sweep"
    shutil.copytree(src, out)
    grid = [(x["method"], x["rank"], x["clusters"]) for x in first["rows"]]
    ref_bytes = (out / "reference.json").read_bytes()

    again = sweep(quick_world.path, grid, per_task=2, seed=0, out=out, dtype="float32")
    assert [x["reused"] for x in again["rows"]] == [True] * len(grid)
    for a, b in zip(first["rows"], again["rows"]):  # carried over, not measured again
        assert {**a, "reused": True} == b
    assert (out / "reference.json").read_bytes() == ref_bytes

    more = sweep(quick_world.path, [*grid, ("jd-diag", 2, 1)], per_task=2, seed=0, out=out, dtype="float32",
                 plots=False)
    assert [x["reused"] for x in more["rows"]] == [True] * len(grid) + [False]

    fewer = sweep(quick_world.path, grid[1:2], per_task=2, seed=0, out=out, dtype="float32", plots=False)
    assert len(fewer["rows"]) == 1 and fewer["rows"][0]["reused"] and len(fewer["rows_outside_grid"]) == 3

    fresh = sweep(quick_world.path, grid[1:2], per_task=1, seed=0, out=out, dtype="float32", plots=False)
    assert fresh["rows"][0]["reused"] is False and fresh["rows_outside_grid"] == []
    assert fresh["fingerprint"] != first["fingerprint"] and (out / "sweep.prev.json").is_file()


# ----------------------------------------------------------------------------- pure functions


def _row(method="jd-full", rank=16, clusters=1, saved=0.97, ns=0.97, drop=0.0, err=0.2) -> dict:
    return {"method": method, "rank": rank, "clusters": clusters, "params_saved": saved, "normalised_score": ns,
            "auroc_drop": drop, "rel_error_mean": err}


def test_choose_takes_the_best_row_meeting_every_target():
    rows = [_row(rank=1, saved=0.96, ns=0.97, drop=0.01),
            _row(rank=2, saved=0.98, ns=0.995, drop=0.03),  # best score, but loses verifier AUROC
            _row(rank=3, saved=0.97, ns=0.99),
            _row(rank=4, saved=0.50, ns=1.00),  # best score, too big
            _row(rank=5, saved=0.985, ns=0.99, drop=None)]  # ties rank 3, saves more; no verifiers to compare
    c = choose(rows)
    assert c["meets_targets"] and c["rank"] == 5 and c["candidates_meeting"] == 3 and c["misses"] == []
    assert "no verifier AUROC" in c["reason"]
    assert choose(rows, max_auroc_drop=0.05)["rank"] == 2
    assert choose(rows, min_saved=0.4)["rank"] == 4
    assert choose([]) is None


def test_choose_flags_the_best_available_row_when_none_meets_the_targets():
    rows = [_row(rank=1, saved=0.96, ns=0.90),
            _row(rank=2, saved=0.97, ns=0.93, drop=0.05),
            _row(rank=3, saved=0.99, ns=None),  # the adapters do not beat the base: no score
            _row(rank=4, saved=0.50, ns=1.00)]
    c = choose(rows)
    assert not c["meets_targets"] and c["rank"] == 2 and c["candidates_meeting"] == 0
    assert len(c["misses"]) == 2 and any("AUROC" in m for m in c["misses"]) and "no candidate meets" in c["reason"]
    small = choose([_row(rank=1, saved=0.6, ns=1.0), _row(rank=2, saved=0.8, ns=0.5)])
    assert not small["meets_targets"] and small["rank"] == 2 and "saves >= 0.95" in small["reason"]


def test_knee_pools_methods_sorted_by_error():
    rows = [_row("svd", err=0.0, ns=1.0), _row("jd-diag", err=0.3, ns=0.96), _row("jd-full", err=0.1, ns=0.99),
            _row("jd-full", err=0.4, ns=0.90), _row("jd-diag", err=0.2, ns=0.97), _row("jd-diag", err=0.5, ns=0.8),
            _row("svd", err=0.45, ns=0.96), _row(ns=None, err=0.05)]
    k = knee(rows)
    assert (k["max_error_ok"], k["first_error_below"]) == (0.3, 0.4)
    assert k["passing_beyond"] == 1 and k["rows"] == 7 and k["rows_without_score"] == 1  # 0.45 passes anyway
    tie = knee([_row(err=0.1, ns=0.99), _row(err=0.3, ns=0.96), _row(err=0.3, ns=0.90)])
    assert (tie["max_error_ok"], tie["first_error_below"]) == (0.1, 0.3)  # at 0.3 one row fails: not safe
    assert knee([_row(err=0.2, ns=0.99)])["first_error_below"] is None
    assert knee([_row(err=0.2, ns=0.5), _row(err=0.3, ns=0.99)])["max_error_ok"] is None
    assert knee([_row(ns=None)])["rows"] == 0 and knee([])["max_error_ok"] is None


def test_candidates_grid_and_plots_of_hand_made_rows(tmp_path):
    assert candidates(["svd", "jd-full"], [8, 16], [1, 4]) == [
        Candidate("svd", 8), Candidate("svd", 16), Candidate("jd-full", 8, 1), Candidate("jd-full", 8, 4),
        Candidate("jd-full", 16, 1), Candidate("jd-full", 16, 4)]
    assert parse_grid("jd-diag:32:8, svd:16:4,jd-diag:32:8") == [Candidate("jd-diag", 32, 8), Candidate("svd", 16)]
    rows = [_row("jd-full", r, saved=1 - r / 400, ns=1 - r / 200, err=r / 100) for r in (2, 4, 8, 16, 32)]
    rows += [_row("jd-diag", r, saved=1 - r / 900, ns=1 - r / 90, err=r / 40, drop=0.05) for r in (2, 8)]
    filled = tmp_path / "filled"
    empty = tmp_path / "empty"
    filled.mkdir()
    empty.mkdir()
    plot({"rows": rows, "choice": choose(rows), "knee": knee(rows), "adapters": 7, "items": 28}, filled)
    plot({"rows": [], "choice": None, "knee": knee([])}, empty)
    red = np.array([int(COLORS["jd-full"][i:i + 2], 16) / 255 for i in (1, 3, 5)])
    for name in ("sweep_saved.png", "sweep_error.png"):
        a, b = _image(filled / name)[..., :3], _image(empty / name)[..., :3]
        near_red = lambda img: (np.abs(img - (0.8 * red + 0.2)).max(-1) < 0.12).sum()  # noqa: E731 (alpha 0.8)
        assert near_red(a) > 50 and near_red(b) == 0, name  # the jd-full points are drawn, in jd-full's colour


def _image(path):
    from matplotlib.image import imread

    return imread(path)


# ----------------------------------------------------------------------------------- errors


def _cli(capsys, *args) -> str:
    assert main(["world", "sweep", *map(str, args)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("kilolora: error:") == 1
    return err


def test_cli_errors_are_one_line(quick_world, tmp_path, capsys, monkeypatch):
    w = quick_world.path
    err = _cli(capsys, "--world", w, "--methods", "svd,foo")
    assert "unknown method 'foo'" in err and "jd-full" in err  # names what is accepted
    assert "rank must be an integer >= 1" in _cli(capsys, "--world", w, "--ranks", "8,0")
    assert "clusters must be an integer >= 1" in _cli(capsys, "--world", w, "--clusters", "-1")
    assert "--ranks must be comma-separated integers" in _cli(capsys, "--world", w, "--ranks", "8,x")
    assert "--grid entries are method:rank:clusters" in _cli(capsys, "--world", w, "--grid", "jd-full")
    assert "--per-task must be >= 1" in _cli(capsys, "--world", w, "--per-task", 0)
    assert "not a kilolora world" in _cli(capsys, "--world", tmp_path)
    bare = tmp_path / "bare"
    shutil.copytree(w, bare, ignore=shutil.ignore_patterns("adapters"))
    assert "no uncompressed adapters" in _cli(capsys, "--world", bare, "--out", tmp_path / "o1")
    out = tmp_path / "o2"
    err = _cli(capsys, "--world", w, "--grid", "jd-full:2:1,jd-full:999:1", "--out", out)
    assert "candidate jd-full:999:1" in err and "larger than target" in err
    assert not list(out.iterdir())  # refused before any fit or scoring
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert "pip install 'kilolora[plots]'" in _cli(capsys, "--world", w, "--out", tmp_path / "o3")
