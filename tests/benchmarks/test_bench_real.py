"""`bench_serving.py --model DIR` (benchmarks/bench_real.py) end to end on a tiny random Llama with the
embedded world's tokenizer and chat template, beside transformers only (no vLLM needed): every
(system, row, batch) cell is there with positive tokens/s, the float32 correctness check passed
(kilolora's greedy tokens equal transformers' and peft's, and the adapters change them), and the
hardware probe and its limit line are printed. The numbers are not checked against anything:
on two busy cores they are noise at this size."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
WORLD_BASE = ROOT / "skills" / "default_world" / "base"


def tiny_chat_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads((WORLD_BASE / "config.json").read_text())["vocab_size"]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(WORLD_BASE / f, path)
    return path


def test_model_mode_prints_one_table_beside_transformers(tmp_path):
    model = tiny_chat_llama(tmp_path / "model")
    out = tmp_path / "rows.json"
    env = {**os.environ, "KILOLORA_CACHE": str(tmp_path / "cache")}  # the bank cache stays in tmp_path
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench_serving.py"), "--model", str(model), "--vs",
            "transformers", "--batch", "1", "3", "--tokens", "4", "--repeats", "1", "--adapters", "2",
            "--dtype", "float32", "--json", str(out)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "kl/tf" in r.stdout and "hardware limit (float32)" in r.stdout, r.stdout

    d = json.loads(out.read_text())
    assert d["correctness"]["passed"] is True, d["correctness"]
    k = d["correctness"]["kilolora"]
    assert k["adapter"] != k["base"] and k["bank"] == k["bank_export"]
    hw = d["hardware"]["best"]
    assert hw["bw_gbs"] > 0 and hw["gemm_gflops"]["float32"] > 0 and len(d["hardware"]["probes"]) == 2

    cells = {(c["system"], c["row"], c.get("path"), c["batch"]): c for c in d["records"]}
    rows = [("base", "base"), ("LoRA-on base", "dense"), ("LoRA-on base", "bank"), ("2 adapters", "dense"),
            ("2 adapters", "bank")]
    want = {("kilolora", row, path, b) for row, path in rows for b in (1, 3)} \
        | {("transformers", row, "base" if row == "base" else "lora", b)
           for row in ("base", "LoRA-on base", "2 adapters") for b in (1, 3)}
    assert set(cells) == want
    for c in cells.values():
        assert c["kind"] == "result", c
        assert c["gen_tok_s"] > 0 and (c["dec_tok_s"] is None or c["dec_tok_s"] > 0), c
        assert len(c["tokens"]) == c["batch"] and all(len(t) == 4 for t in c["tokens"]), c
    # the same greedy tokens in the timed float32 batches (left-padded in transformers)
    assert cells[("kilolora", "base", "base", 3)]["tokens"] == cells[("transformers", "base", "base", 3)]["tokens"]
    assert cells[("kilolora", "2 adapters", "dense", 3)]["tokens"] == \
        cells[("transformers", "2 adapters", "lora", 3)]["tokens"]
