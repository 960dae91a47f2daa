"""The RecZero reward on a rollout batch: the jitted token reward next to the host reference.

Batch: 64 well-formed four-step responses of exactly 512 tokens each (English-like filler in
the sections, ratings in several forms), tokenised by each tokenizer asked for.

* ``token reward``: ``TokenRewardFn`` on the response ids already on the device (the fast
  stream path: these responses average well under 8 bytes a token); median of warm calls.
* ``token reward, full stream``: the same batch forced onto the full-length stream
  (``R * max_token_bytes`` positions), the path a batch of unusually long tokens takes.
* ``host``: what a host-side reward does per batch: decode every response (token bytes joined,
  UTF-8) and run ``rating_reward`` on it; median of runs. The device-to-host copy of the ids a
  rollout would also need is not counted.

Run: ``python -m benchmarks.reward [--tokenizers qwen2 smollm2] [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from benchmarks.common import describe_machine, markdown_table, time_call
from reczero_jax.rewards import TokenRewardFn, rating_reward

N_RESPONSES, RESPONSE_TOKENS = 64, 512
WORDS = (
    "the user enjoys science fiction novels with strong characters and detailed worlds but "
    "dislikes slow pacing long descriptions romance subplots; this item is a classic space "
    "opera praised for its political intrigue ecology and desert setting, although some "
    "readers find the middle section dense"
).split()
RATINGS = ("4", "3.5", "5", "2", "4.25", " 3 ", "1.0", "+4", "4e0", ".45e1")


def load_tokenizer(name: str):
    if name == "qwen2":
        from reczero_jax.assets import qwen2_tokenizer

        return qwen2_tokenizer()
    from transformers import AutoTokenizer

    from reczero_jax.assets import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def make_batch(tokenizer, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [64, 512] int32 (every response exactly 512 tokens), lengths, ratings y."""
    rng = np.random.default_rng(seed)

    def words(n):
        return " ".join(rng.choice(WORDS, size=n))

    def encode(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    rows = []
    for i in range(N_RESPONSES):
        head = encode(
            f"<analyze user>\n{words(60)}\n</analyze user>\n<analyze item>\nDune\n[pos] "
            f"{words(25)}\n[neg] {words(25)}\n</analyze item>\n<match>\n"
        )
        tail = encode(f"\n</match>\n<rate>{RATINGS[i % len(RATINGS)]}</rate>")
        filler = encode(words(RESPONSE_TOKENS))[: RESPONSE_TOKENS - len(head) - len(tail)]
        rows.append(head + filler + tail)
    ids = np.array(rows, dtype=np.int32)
    assert ids.shape == (N_RESPONSES, RESPONSE_TOKENS), ids.shape
    lengths = np.full(N_RESPONSES, RESPONSE_TOKENS, np.int32)
    return ids, lengths, rng.integers(1, 6, size=N_RESPONSES).astype(np.float32)


def host_rewards(fn: TokenRewardFn, ids: np.ndarray, lengths: np.ndarray, y: np.ndarray):
    return [rating_reward(fn.decode(row[:n]), int(t)) for row, n, t in zip(ids, lengths, y, strict=True)]


def median_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark(name: str, repeats: int) -> list[list[object]]:
    tokenizer = load_tokenizer(name)
    fast = TokenRewardFn(tokenizer)
    full = TokenRewardFn(tokenizer, fast_bytes_per_token=fast.token_bytes.max_token_bytes)
    ids, lengths, y = make_batch(tokenizer)
    device_args = [jax.device_put(a) for a in (ids, lengths, y)]

    host_s = median_seconds(lambda: host_rewards(fast, ids, lengths, y), max(repeats // 4, 3))
    rows = []
    for label, fn in (("token reward", fast), ("token reward, full stream", full)):
        timing = time_call(lambda fn=fn: fn(*device_args), repeats=repeats)
        rows.append([name, label, timing.median_s * 1e3, timing.compile_s, host_s * 1e3,
                     host_s / timing.median_s])
        reward, format_ok, _ = fn(*device_args)
        expected = host_rewards(fn, ids, lengths, y)
        assert all(format_ok) and all(r.format_ok for r in expected)
        np.testing.assert_allclose(reward, [r.reward for r in expected], atol=1e-6)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizers", nargs="+", default=["qwen2", "smollm2"],
                        choices=["qwen2", "smollm2"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rows = [row for name in args.tokenizers for row in benchmark(name, args.repeats)]
    print(describe_machine())
    print(f"batch: {N_RESPONSES} responses x {RESPONSE_TOKENS} tokens\n")
    print(markdown_table(
        ["tokenizer", "arm", "jit ms (median)", "compile s", "host decode + rating_reward ms",
         "host / jit"],
        rows,
    ))


if __name__ == "__main__":
    main()
