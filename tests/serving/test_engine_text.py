"""Output text is decoded incrementally and is exactly what decoding the whole output gives.

Three tokenizer families: character-level (the project's), byte-level BPE (GPT-2 / Llama 3: a
character can span tokens) and SentencePiece with byte fallback (Llama 2: `▁` for spaces, the
first token's space dropped, runs of `<0xNN>` tokens). Streams are random token ids (invalid
UTF-8, special tokens) and encodings of multilingual text. References: `tokenizer.decode` of the
whole output, and the engine's text logic as it was, re-decoding everything at every step.
"""

from __future__ import annotations

import random

import pytest
import torch

from serving import Engine, SamplingParams
from serving.model import load_model
from serving.sequence import IncrementalDetokenizer
from tests.helpers import make_tiny_model, save_char_tokenizer

TEXTS = ["héllo wörld, naïve café", "数学很有趣 2+2=4", "emoji 🙂👍🏽 and ÿ", "Привет мир", "a b  c\n\td ab abc"]


def _byte_level():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(TEXTS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _sentencepiece():
    """Llama 2's tokenizer.json layout: BPE with byte fallback, `▁` for spaces, Strip of one space."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    ascii_pieces = [chr(c) for c in range(33, 127)] + ["▁" + chr(c) for c in range(97, 123)]
    for piece in ["▁", "▁hello", "é", "ö", "数", "学", "▁数", "🙂", *ascii_pieces]:  # the rest falls back to bytes
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["char", "char-cleanup", "byte-level", "sentencepiece"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def tokenizer(family, tmp_path_factory):
    if family.startswith("char"):
        tok = save_char_tokenizer(tmp_path_factory.mktemp("char"))
        if family == "char-cleanup":  # " ." -> "." and the like, across tokens (transformers 5 needs both)
            tok.clean_up_tokenization_spaces = True
            tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
        return tok
    return _byte_level() if family == "byte-level" else _sentencepiece()


def _streams(tok, n: int, seed: int) -> list[list[int]]:
    """Random ids (any byte sequence, special tokens) and encodings of multilingual text, alternately."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            out.append([rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))])
        else:
            text = " ".join(rng.choice(TEXTS)[: rng.randint(1, 30)] for _ in range(3))
            out.append(tok.encode(text, add_special_tokens=False) or [3])
    return out


def _full(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def test_incremental_text_is_the_decode_of_the_whole_output_at_every_step(family, tokenizer):
    rng = random.Random(0)
    multibyte = 0
    for ids in _streams(tokenizer, 120, seed=0):
        prompt = [3, 4]
        tokens = list(prompt)
        d = IncrementalDetokenizer(tokenizer, len(prompt))
        for t in ids:
            tokens.append(t)
            d.update(tokens)
            want = _full(tokenizer, tokens[len(prompt):])
            assert d.text(0, len(d)) == want and len(d) == len(want)
            a = rng.randint(0, len(want))
            b = rng.randint(a, len(want))
            run = len(want[:b]) - len(want[:b].rstrip("\ufffd"))
            assert d.text(a, b) == want[a:b] and d.run_before(b, "\ufffd") == run
        multibyte += any(ord(ch) > 127 for ch in want) or "\ufffd" in want
    if not family.startswith("char"):  # non-vacuous: many streams hold multi-byte and incomplete characters
        assert multibyte > 20


def test_each_step_decodes_a_few_tokens_not_the_whole_output(family, tokenizer):
    """Per step a window of a few tokens, except (by design) a full decode in a step where a
    byte-fallback run waits for the rest of a character and so re-renders earlier characters."""
    if tokenizer.clean_up_tokenization_spaces:
        pytest.skip("clean_up_tokenization_spaces rewrites text across tokens: decoded in full by design")
    ids = tokenizer.encode(" ".join(TEXTS * 12), add_special_tokens=False)[:300]
    waits = sum(_full(tokenizer, ids[:n]).endswith("\ufffd") for n in range(1, len(ids) + 1))
    decoded = []
    real = tokenizer.decode
    tokenizer.decode = lambda t, **kw: (decoded.append(len(t)), real(t, **kw))[1]
    try:
        d = IncrementalDetokenizer(tokenizer, 0)
        for n in range(1, len(ids) + 1):
            d.update(ids[:n])
    finally:
        del tokenizer.decode
    assert d.text(0, len(d)) == _full(tokenizer, ids)
    runs = waits if family == "sentencepiece" else 0
    assert len(ids) == 300 and sum(decoded) < 20 * len(ids) + runs * len(ids)  # re-decoding all: 45150


def _reference(tok, out: list[int], stop: list[str]) -> tuple[list[str], str, str, object]:
    """The engine's text logic before incremental decoding (the whole output decoded every step):
    the streamed pieces, the final text, the finish reason and the stop reason, for a request that
    samples `out` with `max_tokens=len(out)`."""
    emitted, deltas = 0, []
    for n in range(1, len(out) + 1):
        text = tok.decode(out[:n], skip_special_tokens=True)
        reason = stop_reason = None
        hits = [(text.find(x), x) for x in stop if x in text]
        if hits:
            cut, which = min(hits)
            text, reason, stop_reason = text[:cut], "stop", which
        if reason is None and n >= len(out):
            reason = "length"
        hold = 0
        if reason is None:
            hold = max((len(x) - 1 for x in stop), default=0)
            while hold < len(text) and text[len(text) - hold - 1] == "\ufffd":
                hold += 1
        visible = len(text) - hold if reason is None else len(text)
        deltas.append(text[emitted: max(visible, emitted)])
        emitted = max(visible, emitted)
        if reason is not None:
            return deltas, text, reason, stop_reason
    raise AssertionError("unreachable")


def _stops(tok, out: list[int], rng: random.Random) -> list[list[str]]:
    """Stop-string sets drawn from the stream's own text: none, a piece of it, two overlapping
    ones, a multi-byte character, and one that never occurs."""
    text = tok.decode(out, skip_special_tokens=True).replace("\ufffd", "")
    sets = [[], ["\x00never"]]
    if len(text) >= 4:
        i = rng.randrange(1, len(text) - 2)
        sets += [[text[i: i + 2]], [text[i: i + 3], text[i + 1]]]
    wide = [ch for ch in text if ord(ch) > 127]
    if wide:
        sets.append([rng.choice(wide)])
    return sets


def test_streamed_and_final_text_with_stop_strings_are_as_before(tokenizer, tmp_path, monkeypatch):
    """Scripted tokens through the engine's step (the sampler replaced): every streamed piece, the
    final text and both reasons equal the re-decode-everything logic's."""
    from serving import scheduler

    make_tiny_model(tmp_path, seed=1, tokenizer=False, vocab_size=len(tokenizer), max_position_embeddings=256)
    engine = Engine(load_model(tmp_path), tokenizer, kv_cache_tokens=1024, block_size=4)
    script: list[int] = []
    monkeypatch.setattr(scheduler, "sample", lambda logits, params, gens: torch.tensor([script.pop(0)]))
    rng = random.Random(1)
    stopped = 0
    for out in _streams(tokenizer, 16, seed=2):
        for stop in _stops(tokenizer, out, rng):
            want = _reference(tokenizer, out, stop)
            script[:] = list(out)
            deltas = list(engine.stream([3, 4, 5], params=SamplingParams(max_tokens=len(out), stop=stop,
                                                                          ignore_eos=True)))
            done = deltas[-1].finished
            assert ([d.text for d in deltas], done.text, done.finish_reason, done.stop_reason) == want
            assert done.token_ids == out[: len(done.token_ids)]
            stopped += done.finish_reason == "stop"
    assert stopped > 10  # non-vacuous: stop strings really cut outputs
    assert engine.blocks.num_used == 0
