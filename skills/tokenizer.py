"""The default world's tokenizer: one token per printable ASCII character plus a few special tokens.

Built with `tokenizers` (a BPE model with no merges over single characters) and saved as
`tokenizer.json` + `tokenizer_config.json` with a chat template, so `transformers.AutoTokenizer`
and `apply_chat_template` work on it like on any hub model. Role markers and the skills'
invocations are *special* tokens (dropped when decoding); the tool markup `[CALC]` / `[/CALC]` is
an ordinary added token, so it stays in decoded text where the orchestrator can read it.
"""

from __future__ import annotations

import os
from pathlib import Path

BOS, EOS, PAD, UNK = "<bos>", "<|end|>", "<pad>", "<unk>"
ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "tool": "<|tool|>"}
CALC_OPEN, CALC_CLOSE = "[CALC]", "[/CALC]"
# The answers of yes/no skills. Lowercase on purpose: the base is pretrained on text where
# lowercase letters are predicted and capitals almost never are, so the unembedding rows of capitals
# stay untrained and no final hidden state can give `Y` more than ~37% probability; an adapter
# (which cannot touch the unembedding) is then stuck near that cap. `y` and `n` reach ~100%.
YES, NO = "y", "n"
VERIFY, CHECK, SELECT = "<|verify|>", "<|check|>", "<|select|>"
"""invocations of the verifier, the self-evaluation and the tool selector skills"""

SPECIAL = [UNK, BOS, EOS, PAD, *ROLES.values(), VERIFY, CHECK, SELECT]
MARKUP = [CALC_OPEN, CALC_CLOSE]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""`<bos><|user|>37*49+12<|end|><|assistant|>` (roles: system, user, assistant, tool)"""


def build_tokenizer():
    """The tokenizer as a `transformers.PreTrainedTokenizerFast` (not yet saved)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = SPECIAL + MARKUP + CHARS
    vocab = {s: i for i, s in enumerate(symbols)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in MARKUP])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   additional_special_tokens=[*ROLES.values(), VERIFY, CHECK, SELECT])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(out_dir: str | os.PathLike):
    """Write `tokenizer.json` and `tokenizer_config.json` (with the chat template) to `out_dir`."""
    fast = build_tokenizer()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def vocab_size() -> int:
    return len(SPECIAL) + len(MARKUP) + len(CHARS)
