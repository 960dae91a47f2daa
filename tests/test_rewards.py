"""Rewards: the host rules on golden cases, the jitted token reward's agreement with them on
generated responses (SmolLM2 and Qwen2 tokenizers), sharding and vmap, the byte table, the
metrics and the offline Qwen2 tokenizer."""

from __future__ import annotations

import math
from collections import Counter
from decimal import Decimal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from reczero_jax.rewards import (
    VARIANTS,
    TokenBytes,
    TokenRewardFn,
    bootstrap_difference,
    bootstrap_intervals,
    get_reward,
    prediction_errors,
    rating_metrics,
    rating_reward,
)
from reczero_jax.rewards.host import answer_section, exact_value, get_variant, parse_number

BATCH, WIDTH = 32, 160  # every token-reward call uses this shape: one compile per tokenizer
TOKENIZERS = ("smollm2_tokenizer", "qwen2_tokenizer")


# ----------------------------------------------------------------------------- helpers


def four_steps(user="likes sci-fi", item="Dune\n[pos] epic\n[neg] long", match="fits", rate="4"):
    return (
        f"<analyze user>{user}</analyze user>\n<analyze item>{item}</analyze item>\n"
        f"<match>{match}</match>\n<rate>{rate}</rate>"
    )


def think(reasoning="weigh it", answer="4"):
    return f"<think>{reasoning}</think>\n<answer>{answer}</answer>"


@pytest.fixture(scope="module")
def reward_fns(request):
    """{(tokenizer fixture name, variant): TokenRewardFn}, built lazily."""
    built = {}

    def get(tokenizer_name, kind):
        if (tokenizer_name, kind) not in built:
            tokenizer = request.getfixturevalue(tokenizer_name)
            built[tokenizer_name, kind] = TokenRewardFn(tokenizer, kind)
        return built[tokenizer_name, kind]

    return get


def pad_batch(id_lists, lengths, seed=0):
    """ids [BATCH, WIDTH] with random garbage after each response (it must be ignored)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 40_000, size=(BATCH, WIDTH), dtype=np.int32)
    for row, token_ids in enumerate(id_lists):
        ids[row, : len(token_ids)] = token_ids
    return ids, np.array(list(lengths) + [0] * (BATCH - len(lengths)), np.int32)


def to_float32(value):
    with np.errstate(over="ignore"):  # 1e99 -> inf is the expected float32 rating
        return np.float32(value)


def rating_string(text, kind):
    section = answer_section(text, get_variant(kind))
    return None if section is None else parse_number(section)


def assert_rating_matches(device_rating, host_rating, number):
    """Device float32 rating against the host's float64 one (see device.py, Exactness)."""
    if host_rating is None:
        assert math.isnan(device_rating)
        return
    reference = to_float32(host_rating)
    if exact_value(number) is None:  # an exponent beyond decimal's limits: float32 0 or inf
        assert device_rating == reference, (number, device_rating, reference)
        return
    # number = m * 10**q with m's trailing zeros dropped (``Decimal.normalize`` overflows
    # on exponents such as 3e99999999)
    _, digit_tuple, q = Decimal(number).as_tuple()
    digits = "".join(map(str, digit_tuple))
    q += len(digits) - len(digits.rstrip("0"))
    short = len(digits.strip("0")) <= 7 and -8 <= q <= 8
    if short or not np.isfinite(reference):
        assert device_rating == reference, (number, device_rating, reference)
    elif abs(reference) < np.finfo(np.float32).tiny:
        assert abs(device_rating) < 2 * np.finfo(np.float32).tiny
    else:
        assert abs(device_rating - reference) <= 2 * np.spacing(abs(reference)), number


def assert_agrees(host, reward, format_ok, rating, number, context):
    assert bool(format_ok) == host.format_ok, context
    assert_rating_matches(float(rating), host.rating, number)
    exact = host.rating is None or (
        float(to_float32(host.rating)) == host.rating
        and float(to_float32(host.reward)) == host.reward
    )
    if exact or not host.format_ok:
        assert float(reward) == host.reward, context
    else:
        assert abs(float(reward) - host.reward) <= 1e-6, context


def check_batch(fn, kind, id_lists, lengths, ground_truths, seed=0):
    """Run the token reward on one padded batch; compare each row with the host reward."""
    ids, padded_lengths = pad_batch(id_lists, lengths, seed)
    ys = np.array(list(ground_truths) + [3] * (BATCH - len(ground_truths)), np.float32)
    reward, format_ok, rating = map(np.asarray, fn(ids, padded_lengths, ys))
    host_fn = get_reward(kind)
    results = []
    for row, (token_ids, length, y) in enumerate(
        zip(id_lists, lengths, ground_truths, strict=True)
    ):
        text = fn.decode(token_ids[:length])
        host = host_fn(text, y)
        number = rating_string(text, kind)
        assert_agrees(host, reward[row], format_ok[row], rating[row], number, (kind, text, y))
        results.append(host)
    return results


# ----------------------------------------------------------------------- golden cases

RATING_TAGS = VARIANTS["rating"].tags
GOLDEN = [
    # (variant, text, y, reward, format_ok, rating)
    ("rating", four_steps(rate="4"), 4, 2.0, True, 4.0),
    ("rating", four_steps(rate="4.5"), 3, 1.25, True, 4.5),
    ("rating", four_steps(rate=" \n3.75\t "), 5, 1.375, True, 3.75),
    ("rating", "Sure!\n" + four_steps(rate="1") + "\nDone.", 5, 0.0, True, 1.0),
    ("rating", four_steps(rate="5"), 1, 0.0, True, 5.0),
    ("rating", four_steps(rate="3.7"), 4, 1.85, True, 3.7),
    # every tag missing, then every tag doubled
    *[
        ("rating", four_steps().replace(tag, "", 1), 4, -1.0, False,
         None if "rate" in tag else 4.0)
        for tag in RATING_TAGS
    ],
    *[
        ("rating", four_steps().replace(tag, tag + tag, 1), 4, -1.0, False,
         None if tag == "<rate>" else 4.0)
        for tag in RATING_TAGS
    ],
    # order: opening tags swapped; a section closed before it opens; nested sections pass
    ("rating", "<analyze item>i</analyze item><analyze user>u</analyze user>"
     "<match>m</match><rate>4</rate>", 4, -1.0, False, 4.0),
    ("rating", "<analyze user>u</analyze user><analyze item>i</analyze item>"
     "</match>m<match><rate>4</rate>", 4, -1.0, False, 4.0),
    ("rating", "<analyze user>u<analyze item>i</analyze user>j</analyze item>"
     "<match>m</match><rate>4</rate>", 4, 2.0, True, 4.0),
    ("rating", "<analyze user>u</analyze user><analyze item>i</analyze item><match>m"
     "<rate>4</match></rate>", 4, -1.0, False, None),
    # empty sections: ASCII whitespace is empty, other whitespace is not (documented)
    ("rating", four_steps(user=""), 4, -1.0, False, 4.0),
    ("rating", four_steps(item=" \t\n\r\x0b\x0c"), 4, -1.0, False, 4.0),
    ("rating", four_steps(match="\u00a0"), 4, 2.0, True, 4.0),
    ("rating", four_steps(match="\u3000\x85"), 4, 2.0, True, 4.0),
    ("rating", four_steps(rate=""), 4, -1.0, False, None),
    ("rating", four_steps(rate=" \n "), 4, -1.0, False, None),
    # rating: the last match of <rate>(.*?)</rate>
    ("rating", "<rate>1</rate> then <rate>2</rate>", 2, -1.0, False, 2.0),
    ("rating", "<rate>a<rate>3</rate>", 3, -1.0, False, None),
    ("rating", "</rate><rate>3", 3, -1.0, False, None),
    ("rating", think(), 4, -1.0, False, None),
    # a special token inside a response is its text, as the authors decode it
    ("rating", four_steps(rate="4<|endoftext|>"), 4, -1.0, False, None),
    ("rating", four_steps(rate="<|im_end|> 4"), 4, -1.0, False, None),
    ("rating", four_steps(match="<|im_start|>"), 4, 2.0, True, 4.0),
    ("rating", four_steps() + "<|im_start|>", 4, 2.0, True, 4.0),
    ("exact", four_steps(rate="4<|im_end|>"), 4, -1.0, False, None),
    ("think_answer", think(answer="4<|endoftext|>"), 4, -1.0, False, None),
    ("answer_only", "4<|im_start|>", 4, -1.0, False, None),
    # exact match: the authors' float(pred) == float(gt), no rounding, on the exact decimal
    ("exact", four_steps(rate="4"), 4, 3.0, True, 4.0),
    ("exact", four_steps(rate=" 4.0 "), 4, 3.0, True, 4.0),
    ("exact", four_steps(rate="40e-1"), 4, 3.0, True, 4.0),
    ("exact", four_steps(rate="+004.000"), 4, 3.0, True, 4.0),
    ("exact", four_steps(rate="5"), 5, 3.0, True, 5.0),
    ("exact", four_steps(rate="1.0"), 1, 3.0, True, 1.0),
    ("exact", four_steps(rate="4"), 3, -0.5, True, 4.0),
    ("exact", four_steps(rate="3.6"), 4, -0.5, True, 3.6),
    ("exact", four_steps(rate="3.4"), 4, -0.5, True, 3.4),
    ("exact", four_steps(rate="2.5"), 2, -0.5, True, 2.5),
    ("exact", four_steps(rate="3.5"), 4, -0.5, True, 3.5),
    ("exact", four_steps(rate="4.5"), 5, -0.5, True, 4.5),
    ("exact", four_steps(rate="4.5000000000000000001"), 5, -0.5, True, 4.5),
    ("exact", four_steps(rate="4.0000000000000000001"), 4, -0.5, True, 4.0),
    ("exact", four_steps(rate="4.49"), 5, -0.5, True, 4.49),
    ("exact", four_steps(rate="4 stars"), 4, -1.0, False, None),
    ("exact", four_steps(match=""), 4, -1.0, False, 4.0),
    # think / answer: each tag once, all four in order, non-empty think
    ("think_answer", think(), 3, 1.5, True, 4.0),
    ("think_answer", "ok " + think(" r ", " 4.5 ") + " bye", 5, 1.75, True, 4.5),
    ("think_answer", "<answer>4</answer><think>r</think>", 4, -1.0, False, 4.0),
    ("think_answer", "<think>r<answer>4</think></answer>", 4, -1.0, False, None),
    ("think_answer", "<think>r</think><answer>4<think></answer>", 4, -1.0, False, None),
    ("think_answer", think(reasoning=" \n"), 4, -1.0, False, 4.0),
    ("think_answer", think() + "<think>", 4, -1.0, False, 4.0),
    ("think_answer", think(answer="0"), 1, -1.0, False, 0.0),
    ("think_answer", four_steps(), 4, -1.0, False, None),
    # answer only: the whole response is the number
    ("answer_only", "4", 4, 2.0, True, 4.0),
    ("answer_only", " 4.5 \n", 3, 1.25, True, 4.5),
    ("answer_only", "Rating: 4", 4, -1.0, False, None),
    ("answer_only", four_steps(), 4, -1.0, False, None),
    ("answer_only", "", 4, -1.0, False, None),
    ("answer_only", "6", 5, -1.0, False, 6.0),
]
# The <rate> grammar: in range (value), parsed but out of range (value), not a number (None).
NUMBERS_IN_RANGE = {
    "4.": 4.0, ".5e1": 5.0, "+4": 4.0, "4e0": 4.0, "4E+0": 4.0, "40e-1": 4.0, "0.4e1": 4.0,
    "004": 4.0, "4.000": 4.0, "1": 1.0, "5.0": 5.0, "0.1e1": 1.0, "500e-2": 5.0, "+.5e1": 5.0,
    "1.000000000000000000000": 1.0, "3.14159265358979": 3.14159265358979, "2.5E0": 2.5,
}
NUMBERS_OUT_OF_RANGE = {
    "0": 0.0, "-4": -4.0, "-0": -0.0, "5.0001": 5.0001, "0.999": 0.999, "6": 6.0,
    "1e99": 1e99, "1e-99": 1e-99, "50": 50.0, "0.5": 0.5, "-.5e1": -5.0,
    # float() rounds both of these into the scale; their exact decimal values are outside it
    "5.0000000000000000001": 5.0, "0.99999999999999999999": 1.0,
}
NOT_NUMBERS = [
    "4 stars", "four", "4.5.6", "--4", "+-4", "4e", "e4", ".", "+", "4_0", "inf", "nan",
    "Infinity", "\u0664", "\uff14", "4\u00a0", "\u20034", "4 .5", "0x4", "4,5", "4.5e1.0",
    "4e+-1", "4e1.5", ".e1", "4..", "4/5", "4e 1", "1e99999999999999999999x", "٣.٥",
]
GOLDEN += [("rating", four_steps(rate=s), 4, 2 - abs(v - 4) / 2, True, v)
           for s, v in NUMBERS_IN_RANGE.items()]
GOLDEN += [("rating", four_steps(rate=s), 4, -1.0, False, v)
           for s, v in NUMBERS_OUT_OF_RANGE.items()]
GOLDEN += [("rating", four_steps(rate=s), 4, -1.0, False, None) for s in NOT_NUMBERS]


@pytest.mark.parametrize(("kind", "text", "y", "reward", "format_ok", "rating"), GOLDEN)
def test_host_golden(kind, text, y, reward, format_ok, rating):
    result = get_reward(kind)(text, y)
    assert result.format_ok is format_ok
    assert result.reward == pytest.approx(reward, abs=1e-12)
    if rating is None:
        assert result.rating is None
    else:
        assert result.rating == rating
        assert math.copysign(1, result.rating) == math.copysign(1, rating)


def test_rating_reward_is_the_default_variant():
    for text, y in [(four_steps(rate="3.5"), 2), ("<rate>4</rate>", 4), (four_steps(), 4)]:
        assert rating_reward(text, y) == get_reward("rating")(text, y) == get_reward()(text, y)


def test_unknown_variant_is_a_clear_error(qwen2_tokenizer):
    with pytest.raises(ValueError, match="unknown reward 'graded'.*answer_only"):
        get_reward("graded")
    with pytest.raises(ValueError, match="unknown reward"):
        TokenRewardFn(qwen2_tokenizer, kind="graded")


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
def test_token_reward_golden(tokenizer_name, request, reward_fns):
    """Every golden case through the token reward, tokenised by both tokenizers."""
    tokenizer = request.getfixturevalue(tokenizer_name)
    for kind in VARIANTS:
        cases = [case for case in GOLDEN if case[0] == kind]
        for start in range(0, len(cases), BATCH):
            chunk = cases[start : start + BATCH]
            id_lists = [tokenizer(text, add_special_tokens=False).input_ids for _, text, *_ in chunk]
            assert all(len(ids) <= WIDTH for ids in id_lists)
            fn = reward_fns(tokenizer_name, kind)
            hosts = check_batch(
                fn, kind, id_lists, [len(ids) for ids in id_lists], [c[2] for c in chunk]
            )
            for (_, text, _, reward, format_ok, _), host, ids in zip(
                chunk, hosts, id_lists, strict=True
            ):
                assert fn.decode(ids) == text
                assert (host.reward, host.format_ok) == (pytest.approx(reward), format_ok)


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
def test_terminating_eos_is_not_part_of_the_response(tokenizer_name, request):
    """The sampler's length counts the EOS that ended a response; both paths score the
    response without it, while an EOS id anywhere else is text like any special token."""
    tokenizer = request.getfixturevalue(tokenizer_name)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    four = tokenizer("4", add_special_tokens=False).input_ids
    rate = tokenizer(four_steps(), add_special_tokens=False).input_ids
    n = len(four)
    cases = {  # kind: [(ids, length, format_ok)]
        "answer_only": [
            (four + [im_end], n + 1, True),
            (four + [endoftext], n + 1, True),
            (four + [im_end, 7], n + 1, True),  # the token after the length is not read
            (four + [im_end], n, True),
            (four + [im_end, im_end], n + 2, False),  # only the last token ends the response
            ([endoftext] + four, n + 1, False),
        ],
        "rating": [
            (rate + [endoftext], len(rate) + 1, True),
            (rate[:-3] + [endoftext] + rate[-3:], len(rate) + 1, False),  # inside <rate>
        ],
    }
    for kind, rows in cases.items():
        fn = TokenRewardFn(tokenizer, kind, eos_ids=(im_end, endoftext))
        hosts = check_batch(fn, kind, [ids for ids, _, _ in rows],
                            [length for _, length, _ in rows], [4] * len(rows))
        assert [h.format_ok for h in hosts] == [ok for *_, ok in rows], kind
    # By default the EOS is the tokenizer's alone: another special token at the end is text.
    default = TokenRewardFn(tokenizer, "answer_only")
    assert default.eos_ids == (tokenizer.eos_token_id,)
    other = endoftext if tokenizer.eos_token_id == im_end else im_end
    hosts = check_batch(default, "answer_only", [four + [tokenizer.eos_token_id], four + [other]],
                        [n + 1, n + 1], [4, 4])
    assert [h.format_ok for h in hosts] == [True, False]


# ------------------------------------------------------------- property-based agreement

ALL_TAGS = [*RATING_TAGS, *VARIANTS["think_answer"].tags]
PARTIAL_TAGS = sorted({tag[:cut] for tag in ALL_TAGS for cut in range(1, len(tag))})
PIECES = [
    "user", "likes", " Dune", "[pos]", "[neg]", "4", "4.5", "five", "é", "e\u0301", "日本語",
    "🎉", "<", ">", "/", "rate", "\\n", " ", "\t", "\n", "\r", "\x0b", "\x0c", "\u00a0",
    "\u2003", "\u3000", "\x1c", "\x85", "\x00",
]
fillers = st.lists(st.sampled_from(PIECES), max_size=6).map("".join)
PADDING = ["", "", "", " ", "\n", "\t ", " \x0c"]  # non-ASCII padding: NOT_NUMBERS


@st.composite
def numbers(draw):
    """Rating strings in every form: mostly grammatical (in and out of range), some not."""
    # sampled_from favours its first entries: the common, well-formed choice goes first.
    if draw(st.sampled_from([False] * 5 + [True])):
        junk = st.text("0123456789.+-eE _", min_size=1, max_size=7)
        return draw(st.one_of(junk, st.sampled_from(NOT_NUMBERS)))
    sign = draw(st.sampled_from(["", "", "", "", "+", "-"]))
    integer = draw(st.sampled_from(["1", "2", "3", "4", "4", "5", "", "0", "00", "6", "45"]))
    fraction = draw(st.text("0123455555990", max_size=11))
    point = draw(st.booleans())
    if not integer and not fraction:
        integer = "3"
    mantissa = integer + ("." + fraction if point or not integer else "")
    exponent = draw(st.sampled_from(
        [""] * 20 + ["e0", "E+0", "e-1", "e1", "e+01", "e-0", "e2", "e-2", "e9", "e-9", "e12",
                     "e-12", "e38", "e39", "e-40", "e-46", "e99999999"]
    ))
    pad = st.sampled_from(PADDING)
    return draw(pad) + sign + mantissa + exponent + draw(pad)


HOME_MODE = {"rating": "four_steps", "exact": "four_steps", "think_answer": "think",
             "answer_only": "bare"}


@st.composite
def response_texts(draw, home):
    """Tagged responses of both families, mutated (tags dropped, doubled, swapped, inserted),
    bare numbers, and free tag soups; mostly of the ``home`` mode."""
    mode = draw(st.sampled_from([home, home, "four_steps", "think", "bare", "soup"]))
    if mode == "bare":
        return draw(numbers()) if draw(st.booleans()) else draw(fillers) + draw(numbers())
    if mode == "soup":
        items = st.one_of(st.sampled_from(ALL_TAGS + PARTIAL_TAGS), fillers, numbers())
        return "".join(draw(st.lists(items, max_size=12)))
    sections = VARIANTS["rating" if mode == "four_steps" else "think_answer"].sections
    parts = []
    for index, (open_tag, close_tag) in enumerate(sections):
        if index == len(sections) - 1:
            content = draw(numbers())
        else:
            content = draw(st.sampled_from(
                ["ok", " summary ", "x", "\u00a0", "[pos] a\n[neg] b", "likes é", "", " \n"]
            ))
            content += draw(fillers) if draw(st.booleans()) else ""
        parts += [open_tag, content, close_tag]
    edits = st.tuples(st.sampled_from(["drop", "double", "swap", "insert"]),
                      st.integers(0, 99), st.integers(0, 99))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        op, i, j = draw(edits)
        i, j = i % len(parts), j % len(parts)
        if op == "drop":
            del parts[i]
        elif op == "double":
            parts.insert(i, parts[i])
        elif op == "swap":
            parts[i], parts[j] = parts[j], parts[i]
        else:
            parts.insert(i, draw(st.sampled_from(ALL_TAGS + PARTIAL_TAGS)))
        if not parts:
            parts = [""]
    return draw(fillers) + "\n".join(parts) + draw(fillers)


@st.composite
def responses(draw, home):
    """(text, token splices, cut fraction or None, y): special or arbitrary token ids spliced
    in (ids beyond the vocabulary included), and cuts anywhere, mid-tag or mid-character."""
    splice = st.tuples(st.floats(0, 1), st.sampled_from(["special", "any"]), st.integers(0, 2**20))
    rarely = st.sampled_from([False] * 3 + [True])
    return (
        draw(response_texts(home)),
        draw(st.lists(splice, min_size=1, max_size=2)) if draw(rarely) else [],
        draw(st.floats(0, 1)) if draw(rarely) else None,
        draw(st.integers(1, 5)),
    )


def to_token_ids(tokenizer, text, splices, cut):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    specials = tokenizer.all_special_ids
    for where, kind, value in splices:
        token = specials[value % len(specials)] if kind == "special" else value % (
            len(tokenizer) + 40) - 20
        ids.insert(int(where * len(ids)), token)
    ids = ids[:WIDTH]
    return ids, len(ids) if cut is None else int(cut * len(ids))


AGREEMENT_CASES = Counter()


@pytest.mark.parametrize("kind", list(VARIANTS))
@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
def test_token_reward_agrees_with_host(tokenizer_name, kind, request, reward_fns,
                                       record_property):
    tokenizer = request.getfixturevalue(tokenizer_name)
    fn = reward_fns(tokenizer_name, kind)
    stats = Counter()

    batches = st.lists(responses(HOME_MODE[kind]), min_size=BATCH // 2, max_size=BATCH)

    @settings(max_examples=16, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batches, st.integers(0, 2**16))
    def check(batch, seed):
        tokenised = [to_token_ids(tokenizer, text, splices, cut) for text, splices, cut, _ in batch]
        hosts = check_batch(fn, kind, [ids for ids, _ in tokenised],
                            [length for _, length in tokenised], [y for *_, y in batch], seed)
        stats["responses"] += len(hosts)
        stats["format_ok"] += sum(host.format_ok for host in hosts)
        stats["rated"] += sum(host.rating is not None for host in hosts)

    check()
    AGREEMENT_CASES[tokenizer_name, kind] = stats["responses"]
    record_property("agreement_cases", stats["responses"])
    print(f"\n{tokenizer_name}/{kind}: {dict(stats)}; all runs so far: "
          f"{sum(AGREEMENT_CASES.values())} responses")
    # The generators must reach both outcomes, or the agreement says little.
    assert 0 < stats["format_ok"] < stats["responses"]
    assert 0 < stats["rated"] < stats["responses"]


def test_full_length_stream_agrees(qwen2_tokenizer, reward_fns):
    """A batch whose text outgrows the fast stream (long tokens) takes the full-length path."""
    fn = reward_fns("qwen2_tokenizer", "rating")
    long_ids = np.flatnonzero(fn.token_bytes.lengths >= 64)
    assert long_ids.size > 0
    head = qwen2_tokenizer(four_steps(match="x")[:-len("<rate>4</rate>")],
                           add_special_tokens=False).input_ids
    tail = qwen2_tokenizer("<rate> 4.5 </rate>", add_special_tokens=False).input_ids
    filler = [int(i) for i in long_ids[: WIDTH - len(head) - len(tail)]]
    ids = head[:-3] + filler + head[-3:] + tail  # long tokens inside the match section
    assert len(ids) <= WIDTH
    assert fn.token_bytes.lengths[ids].sum() > WIDTH * fn.fast_bytes_per_token
    hosts = check_batch(fn, "rating", [ids, ids], [len(ids), len(ids) - 2], [4, 4])
    assert hosts[0].format_ok and not hosts[1].format_ok


# ------------------------------------------------------------------- sharding and vmap


def sample_batch(tokenizer):
    texts = [four_steps(rate=r) for r in ["4", "2.5", "x", "5", "0", "3.25"]]
    texts += ["<rate>4</rate>", think(), "", four_steps(user="")]
    id_lists = [tokenizer(t, add_special_tokens=False).input_ids for t in texts] * 4
    ids, lengths = pad_batch(id_lists[:BATCH], [len(i) for i in id_lists[:BATCH]])
    ys = np.tile(np.arange(1, 6, dtype=np.float32), BATCH)[:BATCH]
    return ids, lengths, ys


def assert_same_outputs(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_batch_matches_unsharded(qwen2_tokenizer, reward_fns):
    fn = reward_fns("qwen2_tokenizer", "rating")
    ids, lengths, ys = sample_batch(qwen2_tokenizer)
    expected = fn(ids, lengths, ys)
    assert bool(jnp.any(expected[1])) and not bool(jnp.all(expected[1]))
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 3)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        sharded = jax.jit(fn)(
            jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp"), None))),
            jax.device_put(lengths, rows),
            jax.device_put(ys, rows),
        )
    for output in sharded:  # still split over the batch, not gathered onto one device
        assert output.sharding.is_equivalent_to(rows, 1)
    assert_same_outputs(sharded, expected)


def test_vmap_matches_batched_call(qwen2_tokenizer, reward_fns):
    fn = reward_fns("qwen2_tokenizer", "exact")
    ids, lengths, ys = sample_batch(qwen2_tokenizer)
    expected = fn(ids, lengths, ys)
    groups = jax.jit(jax.vmap(fn))(
        ids.reshape(4, BATCH // 4, WIDTH), lengths.reshape(4, -1), ys.reshape(4, -1)
    )
    assert_same_outputs([g.reshape(-1) for g in groups], expected)


# ------------------------------------------------------------------------- byte table


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
def test_byte_table_decodes_like_the_tokenizer(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    table = TokenBytes.from_tokenizer(tokenizer)
    for text in ["<analyze user> wörld 日本語 🎉\n\t x", "  two  spaces", "<|im_end|>tail",
                 "<rate>4<|endoftext|></rate><|im_start|>", ""]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert table.decode(ids) == tokenizer.decode(ids, skip_special_tokens=False) == text
    # special tokens are their text (the authors' decode keeps them)
    for token_id in tokenizer.all_special_ids:
        assert table.token_bytes(token_id) == tokenizer.convert_ids_to_tokens(token_id).encode()
    assert table.decode([-1, table.vocab_size, 10**9]) == ""
    # A token cut mid-character decodes with U+FFFD, the shared convention.
    ids = tokenizer("🎉", add_special_tokens=False).input_ids
    if len(ids) > 1:
        assert table.decode(ids[:1]) == table.token_bytes(ids[0]).decode("utf-8", "replace")


def byte_level_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    backend = Tokenizer(models.BPE(alphabet, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens([AddedToken("<think>", special=False)])
    backend.add_special_tokens([AddedToken("<eos>", special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_added_tokens_special_or_not():
    tokenizer = byte_level_tokenizer()
    table = TokenBytes.from_tokenizer(tokenizer)
    think_id, eos_id = tokenizer.convert_tokens_to_ids(["<think>", "<eos>"])
    assert table.token_bytes(think_id) == b"<think>"
    assert table.token_bytes(eos_id) == b"<eos>"
    ids = tokenizer("<think>é<eos>", add_special_tokens=False).input_ids
    assert table.decode(ids) == "<think>é<eos>"


def test_non_byte_level_tokenizers_are_rejected():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="not a byte-level BPE.*WordLevel, not BPE"):
        TokenRewardFn(PreTrainedTokenizerFast(tokenizer_object=word_level))
    sentencepiece_like = Tokenizer(models.BPE({"▁a": 0, "a": 1, "▁": 2}, []))
    sentencepiece_like.pre_tokenizer = pre_tokenizers.Metaspace()
    sentencepiece_like.decoder = decoders.Metaspace()
    with pytest.raises(ValueError, match="not a byte-level BPE.*decoder"):
        TokenRewardFn(PreTrainedTokenizerFast(tokenizer_object=sentencepiece_like))
    with pytest.raises(ValueError, match="no tokenizers backend"):
        TokenRewardFn(object())


# ---------------------------------------------------------------------------- metrics


def test_rating_metrics_score_parse_failures_with_the_fallback():
    metrics = rating_metrics(
        predictions=[4.0, None, 2.6, float("nan"), 5.0, None],
        ground_truths=[4, 3, 3, 5, 1, 3],
        fallback=[3.2, 6.0, 3.0, 0.5, 2.0, 3.0],  # clipped to [1, 5]: 5.0 and 1.0
        format_ok=[True, False, True, False, True, False],
    )
    errors = np.array([0.0, 2.0, -0.4, -4.0, 4.0, 0.0])
    assert metrics["n"] == 6
    assert metrics["n_parse_failures"] == 3
    assert metrics["parse_rate"] == 0.5
    assert metrics["format_rate"] == 0.5
    assert metrics["mae"] == pytest.approx(np.abs(errors).mean())
    assert metrics["rmse"] == pytest.approx(np.sqrt((errors**2).mean()))
    # The last failure's fallback equals the truth, yet it is not counted as correct.
    assert metrics["exact_accuracy"] == pytest.approx(2 / 6)
    assert metrics["within_one_accuracy"] == pytest.approx(2 / 6)


def test_rating_metrics_round_half_to_even_and_scalar_fallback():
    metrics = rating_metrics([2.5, 3.5, 4.5], [2, 4, 5], 3.0, [True] * 3)
    assert metrics["exact_accuracy"] == pytest.approx(2 / 3)
    assert metrics["n_parse_failures"] == 0


def test_rating_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="same length"):
        rating_metrics([4.0], [4, 5], 3.0, [True])
    with pytest.raises(ValueError, match="finite"):
        rating_metrics([None], [4], float("nan"), [False])
    with pytest.raises(ValueError, match="at least one"):
        rating_metrics([], [], 3.0, [])


def test_prediction_errors_follow_the_metrics_fallback():
    predictions, truths, fallback = [4.0, None, 2.6, float("nan")], [4, 3, 3, 5], [3.2, 6.0, 3, 0.5]
    errors = prediction_errors(predictions, truths, fallback)
    np.testing.assert_allclose(errors, [0.0, 2.0, -0.4, -4.0])
    metrics = rating_metrics(predictions, truths, fallback, [True] * 4)
    assert metrics["mae"] == pytest.approx(np.abs(errors).mean())
    assert metrics["rmse"] == pytest.approx(np.sqrt((errors**2).mean()))


def test_bootstrap_intervals_of_a_known_small_input():
    # Two samples, errors 0 and 2: a draw holds both errors 0 (p = 1/4), one of each (1/2) or
    # both 2 (1/4), so MAE is 0, 1 or 2 and RMSE 0, sqrt(2) or 2; the 2.5/97.5 percentiles of
    # 4000 draws are the extremes.
    intervals = bootstrap_intervals([0.0, -2.0], resamples=4000, seed=1)
    assert intervals == {"mae": (0.0, 2.0), "rmse": (0.0, 2.0)}
    # Equal errors: every draw is the same, the interval a point.
    assert bootstrap_intervals([1.5, -1.5, 1.5]) == {"mae": (1.5, 1.5), "rmse": (1.5, 1.5)}


def test_bootstrap_intervals_contain_the_estimate_shrink_with_n_and_repeat_with_the_seed():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 200, 2000):
        errors = rng.choice([-2.0, -1.0, 0.0, 0.0, 1.0, 3.0], size=n)
        intervals = bootstrap_intervals(errors)
        mae, rmse = np.abs(errors).mean(), np.sqrt((errors**2).mean())
        assert intervals["mae"][0] <= mae <= intervals["mae"][1]
        assert intervals["rmse"][0] <= rmse <= intervals["rmse"][1]
        widths.append(intervals["mae"][1] - intervals["mae"][0])
        assert bootstrap_intervals(errors, seed=0) == intervals
        assert bootstrap_intervals(errors, seed=1) != intervals
    # The width falls about as 1 / sqrt(n): ~sqrt(10) per step.
    assert widths[0] > 2 * widths[1] > 4 * widths[2] > 0
    narrow = bootstrap_intervals(errors, level=0.5)["mae"]
    assert intervals["mae"][0] < narrow[0] < narrow[1] < intervals["mae"][1]


def test_bootstrap_difference_is_paired():
    # b is a's errors plus 1 on every sample: each paired draw differs by exactly -1, whatever
    # samples it takes (unpaired intervals of a and b would overlap).
    a = np.random.default_rng(3).choice([0.0, 1.0, 2.0, 3.0], size=50)
    assert bootstrap_difference(a, a + 1.0) == pytest.approx((-1.0, -1.0))
    low, high = bootstrap_difference(a, np.zeros(50))
    assert 0 < low <= np.abs(a).mean() <= high


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="n >= 1"):
        bootstrap_intervals([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_intervals([1.0], level=95)
    with pytest.raises(ValueError, match="same samples"):
        bootstrap_difference([1.0, 2.0], [1.0])


# ----------------------------------------------------------------- Qwen2 tokenizer

QWEN_TEXTS = [
    "Hello world! It's 2025, isn't it?",
    "<analyze user>\nThe user likes sci-fi.\n</analyze user>\n<rate>4.5</rate>",
    "日本語のテキスト、そして中文。 Emoji 🎉🎉 and café au lait.",
    "def f(x):\n    return x**2  # comment\n\n\n",
    "    leading spaces, trailing spaces    ",
    "numbers 1234567890 and 3.14159, 1e-9; URLs https://example.com/a?b=c",
    "Ünïcödé ñ ß ø å — “quotes” ‘single’ … ¿¡",
]


def tiktoken_reference_ids(text, ranks, pattern):
    """tiktoken's algorithm: split by the regex, then merge the lowest-ranked adjacent pair."""
    ids = []
    for piece in regex.findall(pattern, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            pair_ranks = [ranks.get(a + b, math.inf) for a, b in zip(parts, parts[1:], strict=False)]
            best = int(np.argmin(pair_ranks))
            if pair_ranks[best] == math.inf:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        ids += [ranks[part] for part in parts]
    return ids


def test_qwen2_tokenizer_matches_tiktoken_ranks(qwen2_tokenizer):
    import base64

    from reczero_jax import assets

    assert assets.qwen2_tokenizer() is qwen2_tokenizer  # built once per process
    lines = assets.qwen_tiktoken_path().read_bytes().splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in map(bytes.split, lines)}
    for text in QWEN_TEXTS:
        ids = qwen2_tokenizer(text, add_special_tokens=False).input_ids
        assert ids == tiktoken_reference_ids(text, ranks, assets._QWEN2_PRETOKENIZE_REGEX)
        assert qwen2_tokenizer.decode(ids) == text


def test_qwen2_tokenizer_special_tokens_and_chat_template(qwen2_tokenizer):
    specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    for token, token_id in specials.items():
        assert qwen2_tokenizer(token, add_special_tokens=False).input_ids == [token_id]
    assert qwen2_tokenizer.eos_token_id == 151645
    assert qwen2_tokenizer.pad_token_id == 151643
    ids = qwen2_tokenizer("a<|im_end|>b", add_special_tokens=False).input_ids
    assert ids.count(151645) == 1 and len(ids) == 3
    rendered = qwen2_tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert rendered == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
                        "<|im_start|>assistant\n")
