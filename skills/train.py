"""Training: the base model (plain next-token loss), then many LoRA adapters at once.

`MultiLora` holds one zero-initialised LoRA per adapter on every projection and is the serving
model's `LoraHook`: `Transformer.forward_train` runs the same fused layers the engine serves
with, and the hook adds to each example the delta of *its own* adapter (`(x A_iᵀ) B_iᵀ`, batched
as bmm over the examples), masked to the positions the adapter covers. An activated adapter
(aLoRA) covers the tokens from its invocation on, so what it learns is exactly what the engine
serves on top of the base-computed prefix. Adapters are exported as PEFT directories.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compression.peft_io import LoraAdapter, save_adapter
from serving.model import FUSED_GROUPS, Transformer

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100


@dataclass
class Example:
    """One training sequence: `tokens`, the positions whose next token is learned, and routing."""

    tokens: list[int]
    targets: list[int]
    """IGNORE where no loss is taken; else the token to predict at that position"""
    adapter: int = -1
    """index of the adapter that trains on it (-1: none)"""
    start: int = 0
    """first position the adapter covers (an activated adapter's invocation)"""


def lm_example(tokens: list[int], learn_from: int, learn_mask: Sequence[bool] | None = None, **kw) -> Example:
    """Predict tokens[learn_from:] (optionally only where `learn_mask` is True)."""
    targets = [IGNORE] * len(tokens)
    for j in range(max(learn_from, 1), len(tokens)):
        if learn_mask is None or learn_mask[j]:
            targets[j - 1] = tokens[j]
    return Example(tokens, targets, **kw)


def collate(batch: Sequence[Example], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens (B, T), targets (B, T), adapter (B,), coverage mask (B, T, 1), right-padded."""
    t = max(len(e.tokens) for e in batch)
    tokens = torch.full((len(batch), t), pad, dtype=torch.long)
    targets = torch.full((len(batch), t), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        tokens[i, : len(e.tokens)] = torch.tensor(e.tokens)
        targets[i, : len(e.targets)] = torch.tensor(e.targets)
    adapter = torch.tensor([e.adapter for e in batch])
    starts = torch.tensor([e.start for e in batch])
    mask = (torch.arange(t)[None, :] >= starts[:, None]) & (adapter[:, None] >= 0)
    return tokens, targets, adapter, mask[..., None].float()


class MultiLora:
    """n LoRA adapters of rank r on every projection of `model`; a `LoraHook` for `forward_train`.

    Training touches only the adapters of the current batch: `begin(ids)` copies their rows into
    small leaf tensors, the hook computes with those, and `update` applies AdamW to those rows
    alone (a lazy Adam, like `torch.optim.SparseAdam`). With hundreds of adapters this keeps a
    step's cost independent of how many adapters exist (a dense optimizer would zero-fill and
    update every adapter's gradients each step: 3x slower at 330 adapters).
    """

    def __init__(self, model: Transformer, n: int, r: int = 8, lora_alpha: float = 16, seed: int = 0):
        self.n, self.r, self.lora_alpha, self.scaling = n, r, lora_alpha, lora_alpha / r
        self.num_layers = model.config.num_layers
        self.shapes = {m: model.config.module_shape(m) for m in MODULES}  # (d_in, d_out)
        g = torch.Generator().manual_seed(seed)
        self.lora_A: dict[str, torch.Tensor] = {}
        self.lora_B: dict[str, torch.Tensor] = {}
        for layer in range(self.num_layers):
            for m, (d_in, d_out) in self.shapes.items():
                bound = 1 / math.sqrt(d_in)  # peft's kaiming_uniform(a=sqrt(5)) bound
                self.lora_A[f"{layer}_{m}"] = (torch.rand(n, r, d_in, generator=g) * 2 - 1) * bound  # (n, r, d_in)
                self.lora_B[f"{layer}_{m}"] = torch.zeros(n, d_out, r)  # (n, d_out, r)
        self._m: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._steps = torch.zeros(n, dtype=torch.long)
        self._rows: torch.Tensor | None = None  # adapters of the current step
        self._local = torch.full((n,), -1, dtype=torch.long)
        self._live: dict[tuple[str, str], torch.Tensor] = {}
        self._route: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---------------------------------------------------------------- training
    def begin(self, adapter_ids: torch.Tensor) -> None:
        """Start a step over the examples' adapters (-1 entries are ignored)."""
        rows = torch.unique(adapter_ids[adapter_ids >= 0])
        self._rows = rows
        self._local.fill_(-1)
        self._local[rows] = torch.arange(len(rows))
        self._live = {(kind, k): t.index_select(0, rows).requires_grad_()
                      for kind, d in (("A", self.lora_A), ("B", self.lora_B)) for k, t in d.items()}

    def live_parameters(self) -> list[torch.Tensor]:
        return list(self._live.values())

    @torch.no_grad()
    def update(self, lr: float, betas=(0.9, 0.98), eps: float = 1e-8, max_norm: float | None = 1.0) -> None:
        """AdamW (no weight decay) on the current step's rows, with per-adapter step counts."""
        rows = self._rows
        grads = {k: t.grad for k, t in self._live.items() if t.grad is not None}
        if max_norm is not None and grads:
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
            if norm > max_norm:
                for g in grads.values():
                    g.mul_(max_norm / (norm + 1e-6))
        self._steps[rows] += 1
        t = self._steps[rows].double()
        b1, b2 = betas
        for key, g in grads.items():
            store = (self.lora_A if key[0] == "A" else self.lora_B)[key[1]]
            if key not in self._m:
                self._m[key] = (torch.zeros_like(store), torch.zeros_like(store))
            m_all, v_all = self._m[key]
            m = m_all.index_select(0, rows).mul_(b1).add_(g, alpha=1 - b1)
            v = v_all.index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
            m_all[rows], v_all[rows] = m, v
            shape = (-1,) + (1,) * (g.dim() - 1)
            c1 = (1 - b1 ** t).float().view(shape)
            c2 = (1 - b2 ** t).float().view(shape)
            store[rows] = self._live[key].detach() - lr * (m / c1) / ((v / c2).sqrt() + eps)
        self._live, self._rows = {}, None

    # ---------------------------------------------------------------- the hook
    def route(self, adapter: torch.Tensor, mask: torch.Tensor) -> None:
        """Set the batch's adapter per example (B,) (-1 = none) and coverage mask (B, T, 1)."""
        idx = adapter.clamp(min=0)
        if self._rows is not None:
            idx = self._local[idx].clamp(min=0)
        self._route = (idx, mask)

    def _weight(self, kind: str, key: str) -> torch.Tensor:
        if self._rows is not None:
            return self._live[(kind, key)]
        return (self.lora_A if kind == "A" else self.lora_B)[key]

    def __call__(self, layer, group, x, y, extra):  # LoraHook; x (B, T, d_in), y (B, T, d_out)
        idx, mask = self._route
        col = 0
        for m in FUSED_GROUPS[group]:
            a = self._weight("A", f"{layer}_{m}").index_select(0, idx)  # (B, r, d_in)
            b = self._weight("B", f"{layer}_{m}").index_select(0, idx)  # (B, d_out, r)
            d_out = b.shape[1]
            delta = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))  # (B, T, d_out)
            y[..., col:col + d_out] += delta * (self.scaling * mask)
            col += d_out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the adapters and their optimizer (for a resumable build; safetensors)."""
        out = {f"A.{k}": t for k, t in self.lora_A.items()} | {f"B.{k}": t for k, t in self.lora_B.items()}
        for (kind, key), (m, v) in self._m.items():
            out[f"m.{kind}.{key}"], out[f"v.{kind}.{key}"] = m, v
        out["steps"] = self._steps
        return {k: t.contiguous() for k, t in out.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()` of a MultiLora of the same sizes (checked)."""
        for kind, store in (("A", self.lora_A), ("B", self.lora_B)):
            for k in store:
                t = state.get(f"{kind}.{k}")
                if t is None or t.shape != store[k].shape:
                    raise ValueError(f"checkpoint does not match these adapters at {kind}.{k}: "
                                     f"{None if t is None else tuple(t.shape)} vs {tuple(store[k].shape)}")
                store[k] = t.clone()
        self._m = {}
        for name, t in state.items():
            if name.startswith("m."):
                _, kind, key = name.split(".", 2)
                self._m[(kind, key)] = (t.clone(), state[f"v.{kind}.{key}"].clone())
        self._steps = state["steps"].clone()

    def adapter(self, i: int, name: str, config: dict) -> LoraAdapter:
        """Adapter i as a `LoraAdapter` (scaling folded into lora_B), ready to save or compress."""
        lora_A, lora_B = {}, {}
        for layer in range(self.num_layers):
            for m in MODULES:
                part = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                target = f"base_model.model.model.layers.{layer}.{part}.{m}"
                lora_A[target] = self.lora_A[f"{layer}_{m}"][i].detach().clone()
                lora_B[target] = self.lora_B[f"{layer}_{m}"][i].detach().clone() * self.scaling
        return LoraAdapter(name, dict(config), lora_A, lora_B)


def peft_config(base_dir: str, r: int, lora_alpha: float, alora_invocation_tokens: list[int] | None = None) -> dict:
    """The adapter_config.json of an exported adapter."""
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir), "r": r,
           "lora_alpha": lora_alpha, "target_modules": list(MODULES), "lora_dropout": 0.0, "bias": "none",
           "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True}
    if alora_invocation_tokens:
        cfg["alora_invocation_tokens"] = list(alora_invocation_tokens)
    return cfg


def export_peft(multi: MultiLora, i: int, out_dir, config: dict):
    """Write adapter i as a PEFT directory with `config`'s rank and alpha."""
    ad = multi.adapter(i, str(out_dir), config)
    return save_adapter(out_dir, ad.lora_A, ad.lora_B, config, lora_alpha=multi.lora_alpha)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * 0.9 + lr * 0.1


@dataclass
class TrainConfig:
    """An optimisation run."""

    steps: int = 1000
    """optimizer steps"""
    batch_size: int = 64
    """examples per step"""
    lr: float = 3e-3
    """peak learning rate (linear warm-up, cosine decay to 10%)"""
    warmup: int = 50
    """warm-up steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    seed: int = 0
    """seed of batch sampling"""


Step = Callable[[object, float], float]
"""step(batch, lr) -> loss: one forward, backward and update"""


def adamw_step(params: Sequence[nn.Parameter], loss_fn, weight_decay: float = 0.0, max_norm: float = 1.0) -> Step:
    """A step over dense parameters with (fused) AdamW."""
    opt = torch.optim.AdamW(params, lr=0.0, weight_decay=weight_decay, betas=(0.9, 0.98), fused=True)

    def step(batch, lr: float) -> float:
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        return float(loss.detach())

    return step


def multi_lora_step(multi: MultiLora, loss_fn, adapter_ids: Callable[[object], torch.Tensor]) -> Step:
    """A step over the batch's adapters only (`MultiLora.begin` / lazy `update`)."""

    def step(batch, lr: float) -> float:
        multi.begin(adapter_ids(batch))
        loss = loss_fn(batch)
        loss.backward()
        multi.update(lr)
        return float(loss.detach())

    return step


def fit(step: Step, sample: Callable[[random.Random, int], object], cfg: TrainConfig, desc: str,
        progress=None, note: Callable[[], str] | None = None, resume: dict | None = None,
        checkpoint: Callable[[dict], None] | None = None, every: int = 0) -> list[float]:
    """`sample(rng, batch_size)` -> `step(batch, lr)` for `cfg.steps` steps, with a progress bar
    showing the running loss and the time left. Returns the loss curve.

    Resumable: every `every` steps (and at the end) `checkpoint(state)` gets the loop's state
    (`{"step", "losses", "rng"}`, plain JSON); `resume=state` continues from it and draws the
    same batches the uninterrupted run would have drawn."""
    rng = random.Random(cfg.seed)
    losses: list[float] = []
    start = 0
    if resume is not None:
        start, losses = int(resume["step"]), list(resume["losses"])
        version, internal, gauss = resume["rng"]
        rng.setstate((version, tuple(internal), gauss))
    task = progress.add_task(desc, total=cfg.steps, completed=start,
                             loss=_mean(losses[-20:])) if progress is not None else None
    for i in range(start, cfg.steps):
        losses.append(step(sample(rng, cfg.batch_size), _lr_at(i, cfg.steps, cfg.lr, cfg.warmup)))
        if progress is not None:
            progress.update(task, advance=1, loss=_mean(losses[-20:]))
            if note is not None and i % 20 == 0:
                progress.update(task, description=f"{desc} ({note()})")
        if checkpoint is not None and (i + 1 == cfg.steps or every and (i + 1) % every == 0):
            checkpoint({"step": i + 1, "losses": losses, "rng": list(rng.getstate())})
    return losses


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def buckets(batch: Sequence[Example], n: int = 3) -> list[list[Example]]:
    """Split a batch into `n` length-sorted chunks, so each is padded only to its own longest."""
    order = sorted(batch, key=lambda e: len(e.tokens))
    size = math.ceil(len(order) / n)
    return [order[i:i + size] for i in range(0, len(order), size)]


def _token_mean(chunks, chunk_loss) -> torch.Tensor:
    """Mean over every target token of the batch, computed chunk by chunk."""
    total = sum(sum(t != IGNORE for t in e.targets) for c in chunks for e in c)
    return sum(chunk_loss(c) for c in chunks) / max(1, total)


def suffix_only(e: Example) -> bool:
    """An activated example whose every target lies in what its adapter covers: the prefix before
    `start` is the base's alone, so only the suffix needs a graph (`Transformer.forward_train_from`)."""
    return e.adapter >= 0 and e.start > 0 and all(t == IGNORE for t in e.targets[:e.start])


def collate_suffix(batch: Sequence[Example], pad: int):
    """prefix (B, P), prefix lengths (B,), suffix (B, S), suffix targets (B, S), adapter (B,), mask
    (B, S, 1): each example split at its `start`, both parts right-padded."""
    p = max(e.start for e in batch)
    s = max(len(e.tokens) - e.start for e in batch)
    prefix = torch.full((len(batch), p), pad, dtype=torch.long)
    suffix = torch.full((len(batch), s), pad, dtype=torch.long)
    targets = torch.full((len(batch), s), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        prefix[i, : e.start] = torch.tensor(e.tokens[: e.start])
        suffix[i, : len(e.tokens) - e.start] = torch.tensor(e.tokens[e.start:])
        tail = e.targets[e.start:]
        targets[i, : len(tail)] = torch.tensor(tail, dtype=torch.long)
    lens = torch.tensor([e.start for e in batch])
    adapter = torch.tensor([e.adapter for e in batch])
    return prefix, lens, suffix, targets, adapter, torch.ones(len(batch), s, 1)


def lora_loss(model: Transformer, multi: MultiLora, batch: Sequence[Example], pad: int,
              split_activated: bool = False) -> torch.Tensor:
    """Mean next-token loss of each example under its adapter. `split_activated`: the activated
    examples whose targets all lie after their invocation (`suffix_only`) run their base prefix
    without a graph (the same loss and gradients, to float rounding; a verifier's example then costs
    a forward of its context and a backward of its few invoked tokens)."""
    def full_loss(chunk):
        tokens, targets, adapter, mask = collate(chunk, pad)
        multi.route(adapter, mask)
        hidden = model.forward_train(tokens, multi)  # (B, T, D)
        keep = targets != IGNORE
        logits = model.logits(hidden[keep])  # (M, vocab)
        return F.cross_entropy(logits, targets[keep], reduction="sum")

    def suffix_loss(chunk):
        prefix, lens, suffix, targets, adapter, mask = collate_suffix(chunk, pad)
        multi.route(adapter, mask)
        hidden = model.forward_train_from(prefix, lens, suffix, multi)  # (B, S, D)
        keep = targets != IGNORE
        return F.cross_entropy(model.logits(hidden[keep]), targets[keep], reduction="sum")

    if not split_activated:
        return _token_mean(buckets(batch), full_loss)
    fast = [e for e in batch if suffix_only(e)]
    rest = [e for e in batch if not suffix_only(e)]
    total = sum(sum(t != IGNORE for t in e.targets) for e in batch)
    out = sum(full_loss(c) for c in buckets(rest)) if rest else 0
    if fast:
        out = out + sum(suffix_loss(c) for c in buckets(fast))
    return out / max(1, total)


def base_loss(model, batch: Sequence[Example], pad: int) -> torch.Tensor:
    """Next-token loss of a transformers causal LM on the batch's targets."""
    def chunk_loss(chunk):
        tokens, targets, _, _ = collate(chunk, pad)
        logits = model(input_ids=tokens).logits  # (B, T, vocab)
        keep = targets != IGNORE
        return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")

    return _token_mean(buckets(batch), chunk_loss)
