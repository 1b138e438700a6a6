"""The world's tokenizer and task generators against brute-force references."""

from __future__ import annotations

import random

import pytest

from skills import data
from skills.tasks import (LETTERS, Problem, Step, Transform, corrupt, is_heldout, parse_answer, problems,
                          split_steps, step_ok, transform_family)
from skills.tokenizer import CALC_CLOSE, CALC_OPEN, CHECK, EOS, SELECT, VERIFY, YES, save_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


def test_tokenizer_loads_with_transformers_and_renders_the_chat_template(tok):
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "2*3"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<bos><|system|>be brief<|end|><|user|>2*3<|end|><|assistant|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1 + 1 + len("be brief") + 1 + 1 + 3 + 1 + 1  # specials are single tokens
    assert tok.eos_token == EOS and tok.convert_ids_to_tokens(ids[-1]) == "<|assistant|>"


def test_every_printable_character_round_trips_and_markup_survives_decoding(tok):
    text = "".join(chr(c) for c in range(32, 127)) + "\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    sol = f"{CALC_OPEN}37*49{CALC_CLOSE}=1813."
    ids = tok.encode(sol + EOS + VERIFY + CHECK + SELECT, add_special_tokens=False)
    assert len(ids) == 2 + len("37*49=1813.") + 4
    assert tok.decode(ids, skip_special_tokens=True) == sol  # roles/invocations dropped, tool markup kept


def test_problems_are_reproducible_distinct_and_split():
    a, b = problems(300, seed=3), problems(300, seed=3)
    assert [p.question for p in a] == [p.question for p in b]
    assert len({p.question for p in a}) == 300
    assert not any(is_heldout(p.question) for p in a)
    test = problems(100, seed=3, split="test")
    assert all(is_heldout(p.question) for p in test)
    assert not {p.question for p in test} & {p.question for p in problems(2000, seed=5)}
    for p in a + test:  # the steps compute the expression (checked by Python's own arithmetic on ints)
        ops = p.question.replace("-", " - ").replace("+", " + ").split()
        total = int(ops[0].split("*")[0]) * int(ops[0].split("*")[1])
        for op, num in zip(ops[1::2], ops[2::2]):
            total = total + int(num) if op == "+" else total - int(num)
        assert p.answer == total > 0
    with pytest.raises(ValueError, match="split"):
        problems(1, 0, split="dev")


def test_solution_formats_steps_and_checks():
    p = Problem("37*49+12", (Step(37, "*", 49), Step(1813, "+", 12)))
    assert p.solution() == "37*49=1813. 1813+12=1825. Answer: 1825"
    assert p.solution(tool=True) == f"{CALC_OPEN}37*49{CALC_CLOSE}=1813. 1813+12=1825. Answer: 1825"
    assert parse_answer(p.solution()) == 1825 and parse_answer("no answer") is None
    assert split_steps(p.solution()) == ["37*49=1813.", "1813+12=1825."]
    assert [d for d, _ in p.prefixes()] == ["", f"{CALC_OPEN}37*49{CALC_CLOSE}=1813. ",
                                           f"{CALC_OPEN}37*49{CALC_CLOSE}=1813. 1813+12=1825. "]
    good = split_steps(p.solution(tool=True))
    assert [step_ok(p, good, k) for k in range(2)] == [True, True]
    wrong_product = ["37*49=1812.", "1812+12=1824."]
    assert [step_ok(p, wrong_product, k) for k in range(2)] == [False, True]  # step 2 is right given step 1
    assert not step_ok(p, ["37*49=1813.", "1813+12=1826."], 1)
    assert not step_ok(p, ["37*49=1813.", "1812+12=1824."], 1)  # did not carry the previous result
    assert not step_ok(p, ["garbage."], 0)


def test_transformations_against_brute_force():
    fam = transform_family()
    assert len(fam) == 300 and len({t.name for t in fam}) == 300
    rng = random.Random(0)
    for t in fam[:40] + fam[-5:]:
        for x in t.inputs(5, seed=1):
            y = t.apply(x)
            assert len(y) == len(x)
            if t.family == "shift":  # shifting back by k restores the input
                assert Transform("shift", str(26 - int(t.arg))).apply(y) == x
                assert all((ord(b) - ord(a)) % 26 == int(t.arg) for a, b in zip(x, y))
            elif t.family == "add":
                assert all((int(b) - int(a)) % 10 == int(t.arg) for a, b in zip(x, y))
            else:
                src, dst = t.arg.split()
                assert all(b == (dst if a == src else a) for a, b in zip(x, y))
            bad = corrupt(y, t.alphabet, rng)
            assert bad != y and sum(a != b for a, b in zip(bad, y)) == 1
    tr = Transform.parse("shift 3")
    assert tr == Transform("shift", "3") and Transform.parse("replace e a").apply("hello") == "hallo"
    with pytest.raises(ValueError, match="not a transformation"):
        Transform.parse("reverse")
    assert tr.prompt("hello") == "shift: hello"  # the operation, not its parameter
    assert tr.apply("xyz") == "abc" and set(tr.inputs(20, 0)).isdisjoint(tr.inputs(20, 0, "test"))
    assert set("".join(tr.inputs(50, 0))) <= set(LETTERS)


def test_examples_learn_only_their_answers(tok):
    enc = data.Encoder(tok)
    p = problems(1, seed=0)[0]
    ex = enc.example(p.question, data.solution_parts(p, tool=True))
    learned = tok.decode([t for t in ex.targets if t != -100])
    # the tool call and its result are inserted by the selector and the calculator, not learned
    assert learned == p.solution(tool=True).replace(f"{CALC_OPEN}{p.steps[0].expr}{CALC_CLOSE}={p.steps[0].value}", "") + EOS
    s = data.Sample(p, p.solution(), True)
    v = data.verifier_example(enc, s, adapter=0)
    inv = v.tokens.index(tok.convert_tokens_to_ids(VERIFY))
    assert v.start == inv and [t for t in v.targets if t != -100] == tok.encode(YES, add_special_tokens=False)
    assert data.Sample(p, p.solution().replace("Answer: ", "Answer: 1"), True).correct is False
    sel = data.selector_example(enc, random.Random(1), p, adapter=2)
    assert sel.tokens[sel.start] == tok.convert_tokens_to_ids(SELECT)


def test_checker_candidates_are_right_or_wrong_as_labelled():
    rng = random.Random(3)
    for t in transform_family(3, 2, 6, seed=0):
        for _ in range(30):
            x = t.make_input(rng)
            assert data.checker_candidate(t, x, True, rng) == t.apply(x)
            bad = data.checker_candidate(t, x, False, rng)
            assert bad != t.apply(x) and len(bad) == len(x)
    # replace: the wrong answers are the input unchanged or the letter replaced by another one
    t = Transform.parse("replace a b")
    seen = {data.checker_candidate(t, "xaya", False, random.Random(i)) for i in range(40)}
    assert "xaya" in seen and any(s[1] not in "ab" and s[3] == s[1] for s in seen)


def test_calculator_evidence_and_twins_against_brute_force(tok):
    rng = random.Random(5)
    for p in problems(40, seed=3):
        right = p.solution(tool=rng.random() < 0.5)
        checks = data.calc_checks(right)
        assert [(e, c) for e, c, _ in checks] == [(s.expr, str(s.value)) for s in p.steps]
        assert all(claimed == computed for _, claimed, computed in checks)
        wrong = data.wrong_solution(p, rng)
        assert not data.Sample(p, wrong, True).correct
        w = data.calc_checks(wrong)
        # the product is off by one digit; every later step is computed right from it
        assert w[0][1] != w[0][2] and len(w[0][1]) == len(w[0][2])
        assert sum(a != b for a, b in zip(w[0][1], w[0][2])) == 1
        assert all(claimed == computed for _, claimed, computed in w[1:])
        bad_step = data.corrupt_claim(p.steps[0].text(), rng)
        assert not data.step_ok(p, [bad_step], 0) and data.step_ok(p, [p.steps[0].text()], 0)
    assert data.evidence([("37*49", "1773", "1813"), ("1773+12", "1785", "1785")]) == "xv"
    assert data.evidence([]) == ""
    s = data.Sample(p, p.solution(), True)
    v = data.verifier_example(data.Encoder(tok), s, adapter=0)
    inv = v.tokens.index(tok.convert_tokens_to_ids(VERIFY))
    # the evidence is inside the adapter's span (after the invocation), the answer after it
    assert v.start == inv and tok.decode(v.tokens[inv + 1:-1]) == data.evidence(data.calc_checks(s.text))


def test_varied_conversations_keep_the_question_and_learn_only_the_answer(tok):
    """With variety, questions come phrased in words, after system prompts and earlier turns; the
    problem's expression is still in the last user turn, the prompt carries no loss, and the
    learned part is the same solution as with the plain prompt."""
    from skills.tasks import make_problem
    from skills.train import IGNORE

    enc, plain = data.Encoder(tok, variety=0.5), data.Encoder(tok)
    rng = random.Random(0)
    probs = [make_problem(random.Random(i)) for i in range(50)]
    seen_system = seen_history = seen_words = 0
    for _ in range(300):
        ex = data.base_example(enc, rng, probs, transform_family(2, 1, 2), 0)
        text = tok.decode(ex.tokens, skip_special_tokens=False)
        last_user = text.rsplit("<|user|>", 1)[1].split("<|end|>", 1)[0]
        start = max(i for i, t in enumerate(ex.tokens) if t == tok.convert_tokens_to_ids("<|assistant|>"))
        assert all(t == IGNORE for t in ex.targets[:start])  # nothing of the prompt is learned
        answer = tok.decode([t for t in ex.targets if t != IGNORE], skip_special_tokens=False)
        p = next((p for p in probs if p.question in last_user), None)
        if p is not None:  # arithmetic: the solution learned equals the plain prompt's
            ref = plain.example(p.question, data.solution_parts(p, tool=CALC_OPEN in text.rsplit("<|assistant|>", 1)[1]))
            assert answer == tok.decode([t for t in ref.targets if t != IGNORE], skip_special_tokens=False)
            seen_words += last_user != p.question
        seen_system += "<|system|>" in text
        seen_history += text.count("<|user|>") > 1
    assert seen_system > 30 and seen_history > 30 and seen_words > 30
    # without variety (the default) nothing changes and the rng is not consumed
    a, b = random.Random(5), random.Random(5)
    ex = data.base_example(plain, a, probs, transform_family(2, 1, 2), 0)
    assert "<|system|>" not in tok.decode(ex.tokens, skip_special_tokens=False)
    data.verifier_context(plain, probs[0], probs[0].solution(), b)
    assert b.random() == random.Random(5).random()
