"""Helpers for tests: real PEFT adapters on tiny random HF Llama models."""

from __future__ import annotations

import contextlib
import warnings

import torch


def load_base(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).eval()


def make_peft_adapter(base_dir, out_dir, seed: int, **lora_kwargs):
    """Create a real PEFT LoRA adapter with random (non-zero) A and B and save it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kwargs = dict(target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    kwargs.update(lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_base(base_dir), LoraConfig(**kwargs)).eval()
    model.save_pretrained(out_dir)
    return model


def peft_logits(base_dir, adapter_dir, input_ids):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(base_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def teacher_forced(engine, ids: list[int], adapter: str | None) -> torch.Tensor:
    """The engine's log p(ids[j] | ids[:j]) for j >= 1, under `adapter`."""
    seq = engine.open(ids[:1])
    try:
        return torch.tensor(engine.score(seq, ids[1:], adapter=adapter))
    finally:
        engine.close(seq)


def hf_teacher_forced(model, ids: list[int], device="cpu") -> torch.Tensor:
    """The same log-probabilities from a transformers / peft model (on the CPU)."""
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([ids], device=device)).logits[0].float().log_softmax(-1).cpu()
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def mixed_batch_outputs(engine, adapters: list, atol: float, rtol: float) -> set[tuple[int, ...]]:
    """Generate one random prompt per adapter in one batch and each alone: the tokens must be equal
    and the log-probabilities close. Returns the distinct outputs (to check the adapters differ)."""
    from serving import SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 64, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
               for _ in adapters]
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=0, ignore_eos=True)
    together = engine.generate(prompts, adapter=adapters, params=params)
    outputs = set()
    for prompt, adapter, got in zip(prompts, adapters, together):
        alone = engine.generate([prompt], adapter=adapter, params=params)[0]
        assert got.token_ids == alone.token_ids, adapter
        torch.testing.assert_close(torch.tensor([t.logprob for t in got.logprobs]),
                                   torch.tensor([t.logprob for t in alone.logprobs]), atol=atol, rtol=rtol)
        outputs.add(tuple(got.token_ids))
    return outputs


TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +-*=.,:;!?()[]/ABCDEFGHIJ"


def make_tiny_model(out_dir, arch: str = "llama", seed: int = 0, tokenizer: bool = True, **overrides):
    """Save a tiny random `arch` (llama, mistral, qwen2) checkpoint, with a char-level tokenizer."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
    cfg_cls, model_cls = (getattr(transformers, n) for n in classes[arch])
    kwargs = dict(TINY)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kwargs)).eval()
    model.save_pretrained(out_dir)
    if tokenizer:
        save_char_tokenizer(out_dir)
    return model


def save_char_tokenizer(out_dir):
    """A 64-symbol character tokenizer (`<eos>` is id 2, as the tiny configs say) saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = ["<unk>", "<bos>", "<eos>"] + list(CHARS[: 64 - 3])
    vocab = {s: i for i, s in enumerate(symbols)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    fast.save_pretrained(out_dir)
    return fast


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(argv: list[str], env: dict[str, str], log, url: str, *, ready_path: str = "/health",
                   startup_s: float = 120, what: str = "the server", stop_s: float = 15):
    """`argv` as a real subprocess logging to the file `log`; yields the process once GET
    `url + ready_path` answers 200 (or raises with the log's tail if it exits or `startup_s`
    passes), then terminates it (killed after `stop_s`)."""
    import subprocess
    import time
    import urllib.request

    with open(log, "w") as f:  # a file: a full pipe would block the server
        proc = subprocess.Popen([str(a) for a in argv], env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + ready_path, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer {ready_path} in {startup_s:.0f} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def kilolora_server(args: list[str], log):
    """`kilolora serve ARGS --port P` as a real subprocess logging to the file `log`; yields its base
    URL once /health answers, stops it after. Its log must hold no traceback: a 500 anywhere fails."""
    import os
    import sys
    from pathlib import Path

    port = free_port()
    exe = Path(sys.executable).with_name("kilolora")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    url = f"http://127.0.0.1:{port}"
    with server_process([exe, "serve", *args, "--port", port], env, log, url, what="kilolora serve") as proc:
        yield url
    assert proc.returncode in (0, -15), f"kilolora serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
    assert "Traceback" not in log.read_text(), log.read_text()[-5000:]

