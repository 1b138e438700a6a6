"""The multi-adapter trainer: its forward equals transformers, its adapters export to PEFT
adapters that `peft` and the engine reproduce, and its lazy Adam equals torch's AdamW."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from serving.engine import Engine
from serving.model import load_model
from skills.train import MultiLora, collate, export_peft, lm_example, lora_loss, peft_config
from tests.helpers import load_base, make_tiny_model

INV = 7  # invocation token of the activated adapter in these tests


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    make_tiny_model(d, "llama", seed=3, tokenizer=False)
    return d


def _tokens(b, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(8, 60, (b, t), generator=g)  # never the invocation token
    x[2, 5] = INV
    return x


def _randomised(model, n, seed=0):
    multi = MultiLora(model, n=n, r=4, lora_alpha=8, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for k, b in multi.lora_B.items():
        b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return multi


def test_forward_train_equals_transformers(base_dir):
    model = load_model(base_dir)
    tokens = _tokens(3, 11)
    with torch.no_grad():
        ours = model.logits(model.forward_train(tokens))
        ref = load_base(base_dir)(input_ids=tokens).logits
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_exported_adapters_equal_peft_and_the_engine(base_dir, tmp_path):
    from peft import PeftModel

    model = load_model(base_dir)
    multi = _randomised(model, n=3)
    tokens = _tokens(3, 11)
    starts = [0, 0, 5]
    examples = [lm_example(tokens[i].tolist(), 1, adapter=i, start=starts[i]) for i in range(3)]
    t, _, adapter, mask = collate(examples, pad=0)
    multi.route(adapter, mask)
    with torch.no_grad():
        ours = model.logits(model.forward_train(t, multi))  # (3, T, V)
        base = model.logits(model.forward_train(t))
    engine = Engine.from_pretrained(base_dir)
    for i in range(3):
        out = tmp_path / f"a{i}"
        export_peft(multi, i, out, peft_config(str(base_dir), 4, 8, [INV] if i == 2 else None))
        engine.load_adapter(f"a{i}", out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(load_base(base_dir), str(out)).eval()
        with torch.no_grad():
            ref = peft_model(input_ids=tokens[i:i + 1]).logits[0]
        assert (ours[i] - base[i]).abs().max() > 1e-2  # the adapter matters
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=1e-5)
        # the engine serves the same adapter: its teacher-forced log-probs equal ours
        seq = engine.open(tokens[i, :1].tolist())
        got = torch.tensor(engine.score(seq, tokens[i, 1:].tolist(), adapter=f"a{i}"))
        engine.close(seq)
        want = F.log_softmax(ours[i, :-1], -1).gather(1, tokens[i, 1:, None])[:, 0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the activated adapter leaves everything before its invocation exactly base
    torch.testing.assert_close(ours[2, :5], base[2, :5], atol=0, rtol=0)
    assert (ours[2, 5:] - base[2, 5:]).abs().max() > 1e-2


def test_lazy_adam_equals_adamw_on_the_rows_it_touches(base_dir):
    model = load_model(base_dir)
    lazy = _randomised(model, n=4, seed=5)
    dense = _randomised(model, n=4, seed=5)
    params = {("A", k): torch.nn.Parameter(v.clone()) for k, v in dense.lora_A.items()}
    params.update({("B", k): torch.nn.Parameter(v.clone()) for k, v in dense.lora_B.items()})
    dense.lora_A = {k: params[("A", k)] for k in dense.lora_A}
    dense.lora_B = {k: params[("B", k)] for k in dense.lora_B}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    tokens = _tokens(4, 9, seed=2)
    batch = [lm_example(tokens[i].tolist(), 1, adapter=[0, 2, 2, 3][i]) for i in range(4)]
    untouched = lazy.lora_A["0_q_proj"][1].clone()
    for _ in range(3):
        lazy.begin(torch.tensor([e.adapter for e in batch]))
        lora_loss(model, lazy, batch, pad=0).backward()
        lazy.update(1e-2, max_norm=None)
        opt.zero_grad()
        lora_loss(model, dense, batch, pad=0).backward()
        opt.step()
    for (kind, k), p in params.items():
        got = (lazy.lora_A if kind == "A" else lazy.lora_B)[k]
        torch.testing.assert_close(got[[0, 2, 3]], p.detach()[[0, 2, 3]], atol=1e-6, rtol=1e-5)
    assert torch.equal(lazy.lora_A["0_q_proj"][1], untouched)  # not in any batch: never moved
    assert not torch.equal(lazy.lora_B["0_q_proj"][0], torch.zeros_like(lazy.lora_B["0_q_proj"][0]))
