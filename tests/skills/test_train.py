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


def test_split_activated_loss_and_gradients_equal_the_full_forward(base_dir):
    """`lora_loss(split_activated=True)`: activated examples run their base prefix without a graph
    (`forward_train_from`); loss and every adapter gradient equal the full forward's. The batch
    mixes activated examples of different prefix and suffix lengths, a plain one, and an activated
    one with a target before its start (which must take the full path)."""
    from skills.train import Example, IGNORE, suffix_only

    model = load_model(base_dir)
    tokens = _tokens(6, 14, seed=4)

    def activated(i, length, start, adapter, early=False):
        toks = tokens[i, :length].tolist()
        targets = [IGNORE] * length
        for j in range(start, length - 1):
            targets[j] = toks[j + 1]
        if early:
            targets[start - 3] = toks[start - 2]
        return Example(toks, targets, adapter=adapter, start=start)

    batch = [activated(0, 14, 9, 0), activated(1, 10, 3, 1), activated(2, 12, 11, 1),
             lm_example(tokens[3, :8].tolist(), 1, adapter=2), activated(4, 13, 6, 2, early=True),
             activated(5, 9, 1, 0)]
    assert [suffix_only(e) for e in batch] == [True, True, True, False, False, True]
    multi = _randomised(model, n=3, seed=7)
    grads, losses = [], []
    for split in (False, True):
        multi.begin(torch.tensor([e.adapter for e in batch]))
        loss = lora_loss(model, multi, batch, pad=0, split_activated=split)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: t.grad.clone() for k, t in multi._live.items()})
        multi._live, multi._rows = {}, None
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)
    assert any(g.abs().max() > 1e-4 for g in grads[0].values())  # the gradients compared are not all zero


def test_forward_train_from_equals_forward_train_without_an_adapter(base_dir):
    model = load_model(base_dir)
    tokens = _tokens(3, 12, seed=6)
    starts = torch.tensor([4, 1, 9])
    prefix = torch.zeros(3, 9, dtype=torch.long)
    suffix = torch.zeros(3, 11, dtype=torch.long)
    for i, s in enumerate(starts.tolist()):
        prefix[i, :s], suffix[i, :12 - s] = tokens[i, :s], tokens[i, s:]
    with torch.no_grad():
        full = model.forward_train(tokens)
        part = model.forward_train_from(prefix, starts, suffix)
    for i, s in enumerate(starts.tolist()):
        torch.testing.assert_close(part[i, :12 - s], full[i, s:], atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prefix lengths"):
        model.forward_train_from(prefix, torch.tensor([0, 1, 2]), suffix)
