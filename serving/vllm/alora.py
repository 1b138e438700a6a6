"""Activated LoRA (aLoRA) for vLLM 0.32, as a plugin that monkeypatches five points of vLLM.

An activated adapter (Greenewald et al. 2025, arXiv 2504.12397; PEFT's `alora_invocation_tokens`)
applies from the start of the *last* occurrence of its invocation tokens in the prompt onward;
the tokens before it are the base model's, so their KV is the base's and a verifier called after
a base generation computes only its own tokens. vLLM 0.32 refuses such adapters ("vLLM does not
support Activated LoRA (aLoRA)"); upstream's attempt (vllm-project/vllm#19710, closed unmerged)
swapped the QKV layers for masked ones. vLLM already routes LoRA per *token*
(`token_lora_mapping` → the punica wrapper, where id 0 → index -1 = no adapter), so this plugin
only chooses, per token, the base or the adapter, and keys the prefix cache the same way:

1. `PEFTHelper._validate_features` (vllm/lora/peft_helper.py): the aLoRA refusal is dropped,
   but only in a process whose model runner is the patched V1 one (point 3 sets the flag), so
   Model Runner V2 (vllm/v1/worker/gpu/, the GPU default when Triton is present) still refuses
   rather than apply the adapter to the whole prompt.
2. `generate_block_hash_extra_keys` (vllm/v1/core/kv_cache_utils.py, and the names
   `block_pool.py` and the offload manager imported from it): a block that ends at or before the
   invocation start carries no `("lora", name, path)` key, so it is the base's block (a hit on
   what the base computed, and a block the base can reuse later). Blocks from the one holding
   the invocation on keep the key.
3. `InputBatch.add_request` / `remove_request` / `make_lora_inputs`
   (vllm/v1/worker/gpu_input_batch.py, the V1 runner the CPU runner subclasses): each aLoRA
   request's invocation start is kept by request id, and the token mapping gives id 0 (base) to
   every scheduled token at a position before it (positions are `num_computed_tokens_cpu` +
   offset, as `_prepare_inputs` computes them); sampled-token rows follow their token.
4. `GPUModelRunner.load_lora_model` (V1): sets the flag of point 1.
5. `bgmv_shrink` / `bgmv_expand` / `bgmv_expand_slice` (vllm/lora/ops/torch_ops/lora_ops.py,
   the CPU path): a vLLM bug fix. They gather `weights[indices]`, so index -1 (no adapter) reads
   the *last* slot: once all `--max-loras` slots hold adapters, base tokens batched with LoRA
   tokens are computed with that adapter (measured: base greedy text turns to garbage with 4
   plain LoRAs in 4 slots, unpatched vLLM). aLoRA mixes the two inside every request, so it
   needs this; plain multi-LoRA serving on CPU does too. The Triton (GPU) kernels skip -1.

No invocation in the prompt: the adapter never applies (PEFT's rule; kilolora's engine does the
same), so the request is the base's. Only the prompt is searched, as in kilolora's engine.
The invocation tokens are read from the adapter's `adapter_config.json` at `lora_path`, in the
engine-core process (hashing) and the worker (mapping), cached by path and mtime.

`install()` patches only vLLM 0.32 (it checks `vllm.__version__`) and is idempotent; other
versions are left alone, with a warning, so they keep refusing aLoRA. Not covered: Model Runner
V2, speculative decoding of aLoRA requests (draft tokens would be mapped by position like any
other, but this is untested), prompt embeddings (no token ids to search: never activated).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from functools import wraps

import numpy as np

SUPPORTED = (0, 32)
"""the vLLM (major, minor) whose internals these patches were written against"""
REFUSAL = "vLLM does not support Activated LoRA (aLoRA)."
"""the message vLLM 0.32's PEFTHelper adds for an adapter with `alora_invocation_tokens`"""
NEVER = 1 << 62
"""invocation start of a request whose prompt lacks the invocation: the adapter never applies"""

logger = logging.getLogger(__name__)
_installed = False
_runner_patched = False
"""set in a process whose V1 model runner loaded LoRA with the patched mapping (point 4)"""
_config_cache: dict[tuple[str, int], list[int] | None] = {}


# ------------------------------------------------------------------ semantics
def find_last(tokens, pattern) -> int | None:
    """Start of the last occurrence of `pattern` in `tokens` (PEFT's aLoRA activation rule)."""
    n = len(pattern)
    if n == 0:
        return None
    for i in range(len(tokens) - n, -1, -1):
        if list(tokens[i: i + n]) == list(pattern):
            return i
    return None


def invocation_tokens(lora_request) -> list[int] | None:
    """The adapter's `alora_invocation_tokens` (None: a plain LoRA), from its adapter_config.json."""
    if lora_request is None:
        return None
    path = getattr(lora_request, "lora_path", None)
    if not path:
        return None
    cfg = os.path.join(path, "adapter_config.json")
    try:
        key = (cfg, os.stat(cfg).st_mtime_ns)
    except OSError:
        return None
    if key not in _config_cache:
        with open(cfg) as f:
            tokens = json.load(f).get("alora_invocation_tokens") or None
        # malformed: None here (never raise inside the scheduler or the worker's step); the
        # adapter's load is refused by the validation patch, so no request runs with it
        _config_cache[key] = tokens if valid_tokens(tokens) else None
    return _config_cache[key]


def valid_tokens(tokens) -> bool:
    return isinstance(tokens, list) and bool(tokens) and all(isinstance(t, int) and t >= 0 for t in tokens)


def activation_start(prompt_token_ids, lora_request) -> int | None:
    """First prompt position the adapter applies to: None for a plain LoRA (or no adapter), the
    start of the last invocation, else NEVER."""
    tokens = invocation_tokens(lora_request)
    if tokens is None:
        return None
    if prompt_token_ids is None:
        return NEVER
    p = find_last(prompt_token_ids, tokens)
    return NEVER if p is None else p


def _ranges(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """concat(range(first[i], first[i] + counts[i]) for i): [2, 7], [2, 1] -> [2, 3, 7]"""
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(first, counts) + within


def token_mapping(lora_ids: np.ndarray, starts: np.ndarray, computed: np.ndarray, scheduled: np.ndarray,
                  sampled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token and per-sampled-row LoRA ids: request i's id, or 0 (base) at positions before
    starts[i] (-1: a plain LoRA, on everywhere). Request i's scheduled tokens sit at positions
    computed[i] + [0, scheduled[i]); its sampled rows are the last sampled[i] of them.
    All arrays (R,) per request; returns (T,) and (S,) with T = sum(scheduled), S = sum(sampled)."""
    pos = _ranges(computed, scheduled)                                      # (T,)
    tok = np.where(pos >= np.repeat(starts, scheduled), np.repeat(lora_ids, scheduled), 0)
    spos = _ranges(computed + scheduled - sampled, sampled)                 # (S,)
    samp = np.where(spos >= np.repeat(starts, sampled), np.repeat(lora_ids, sampled), 0)
    return tok, samp


# ------------------------------------------------------------------ patches
def _request_start(request) -> int | None:
    """The engine-core `Request`'s activation start, computed once per request."""
    start = getattr(request, "_kilolora_alora_start", False)
    if start is False:
        start = activation_start(request.prompt_token_ids, request.lora_request)
        request._kilolora_alora_start = start
    return start


def _patch_hash_keys(kv_cache_utils) -> None:
    original = kv_cache_utils.generate_block_hash_extra_keys

    @wraps(original)
    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, mm_idx = original(request, start_token_idx, end_token_idx, start_mm_idx)
        if keys is not None and request.lora_request is not None:
            start = _request_start(request)
            if start is not None and end_token_idx <= start:  # a block wholly before the invocation
                keys = tuple(k for k in keys if not (isinstance(k, tuple) and k and k[0] == "lora")) or None
        return keys, mm_idx

    generate_block_hash_extra_keys._kilolora_original = original
    # get_request_block_hasher looks the name up in its module; block_pool.py and the offload
    # manager hold their own copies from `from ... import`
    _replace(original, generate_block_hash_extra_keys)


def _patch_input_batch(InputBatch) -> None:
    add, remove = InputBatch.add_request, InputBatch.remove_request

    @wraps(add)
    def add_request(self, request):
        index = add(self, request)
        starts = self.__dict__.setdefault("_kilolora_alora_starts", {})
        start = activation_start(request.prompt_token_ids, request.lora_request)
        if start is None:
            starts.pop(request.req_id, None)
        else:
            starts[request.req_id] = start
        return index

    @wraps(remove)
    def remove_request(self, req_id):
        self.__dict__.get("_kilolora_alora_starts", {}).pop(req_id, None)
        return remove(self, req_id)

    def make_lora_inputs(self, num_scheduled_tokens, num_sampled_tokens):
        """vLLM's mapping, with the tokens before an aLoRA request's invocation mapped to the base."""
        n = self.num_reqs
        lora_ids = self.request_lora_mapping[:n]
        starts_by_id = self.__dict__.get("_kilolora_alora_starts") or {}
        active = set(self.lora_id_to_lora_request.values())
        if not starts_by_id:
            return (tuple(lora_ids.repeat(num_sampled_tokens)), tuple(lora_ids.repeat(num_scheduled_tokens)), active)
        starts = np.array([starts_by_id.get(r, -1) for r in self.req_ids[:n]], dtype=np.int64)
        tok, samp = token_mapping(lora_ids.astype(np.int64), starts, self.num_computed_tokens_cpu[:n].astype(np.int64),
                                  np.asarray(num_scheduled_tokens, dtype=np.int64),
                                  np.asarray(num_sampled_tokens, dtype=np.int64))
        return tuple(samp.tolist()), tuple(tok.tolist()), active

    InputBatch.add_request, InputBatch.remove_request = add_request, remove_request
    InputBatch.make_lora_inputs = make_lora_inputs


def _replace(original, patched) -> None:
    """Point every vllm module's name for `original` at `patched` (`from x import f` copies).
    vars(), not getattr: lazy modules (transformers) import on attribute access."""
    for name, mod in list(sys.modules.items()):
        if name.startswith("vllm.") or name == "vllm":
            for attr, value in list(vars(mod).items()):
                if value is original:
                    setattr(mod, attr, patched)


def _patch_torch_lora_ops(lora_ops) -> None:
    """vLLM 0.32's torch LoRA ops (the CPU path) gather `weights[indices]`, so a token with no
    adapter (index -1) gets the adapter in the *last* slot: harmless while that slot is empty,
    wrong once all `--max-loras` slots are filled (then a base request batched with a LoRA one
    is computed partly with an adapter; with aLoRA, every activated request's own prefix is).
    The Triton kernels skip -1. Zeroing those tokens' inputs makes their LoRA term zero."""
    for fname in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        original = getattr(lora_ops, fname)

        def masked(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, _op=original, **kwargs):
            off = lora_indices_tensor < 0                                    # (T,)
            if off.any():
                inputs = inputs.masked_fill(off.view(-1, *([1] * (inputs.dim() - 1))), 0)
            return _op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)

        wraps(original)(masked)
        _replace(original, masked)


def _patch_runner(GPUModelRunner) -> None:
    load = GPUModelRunner.load_lora_model

    @wraps(load)
    def load_lora_model(self, *args, **kwargs):
        global _runner_patched
        _runner_patched = True
        return load(self, *args, **kwargs)

    GPUModelRunner.load_lora_model = load_lora_model


def _patch_validation(PEFTHelper) -> None:
    validate = PEFTHelper._validate_features

    @wraps(validate)
    def _validate_features(self):
        errors = validate(self)
        if _runner_patched and REFUSAL in errors:
            errors = [e for e in errors if e != REFUSAL]
            if not valid_tokens(self.alora_invocation_tokens):
                errors.append(f"alora_invocation_tokens must be a list of token ids (integers >= 0); "
                              f"got {self.alora_invocation_tokens!r}.")
        return errors

    PEFTHelper._validate_features = _validate_features


def supported(version: str) -> bool:
    parts = version.split(".")
    try:
        return (int(parts[0]), int(parts[1])) == SUPPORTED
    except (IndexError, ValueError):
        return False


def install() -> bool:
    """Patch vLLM for activated LoRA (module docstring). Returns whether the patches are live;
    on a vLLM other than 0.32 nothing is patched (a warning says so). Safe to call again."""
    global _installed
    if _installed:
        return True
    import vllm

    if not supported(vllm.__version__):
        logger.warning("kilolora aLoRA plugin: written for vLLM %d.%d, found %s; not patching "
                       "(vLLM keeps refusing activated adapters)", *SUPPORTED, vllm.__version__)
        return False
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    probe = PEFTHelper(r=1, lora_alpha=1, target_modules=[], alora_invocation_tokens=[0])
    if REFUSAL not in probe._validate_features():
        logger.warning("kilolora aLoRA plugin: vLLM's aLoRA refusal is not where it was expected; not patching")
        return False
    from vllm.lora.ops.torch_ops import lora_ops

    _patch_torch_lora_ops(lora_ops)
    _patch_hash_keys(kv_cache_utils)
    _patch_input_batch(InputBatch)
    _patch_runner(GPUModelRunner)
    _patch_validation(PEFTHelper)
    _installed = True
    return True


def installed() -> bool:
    return _installed
