"""The bytes each token id stands for, read from a byte-level BPE tokenizer.

Byte-level BPE vocabularies (GPT-2's scheme, used by SmolLM2, Llama 3, Qwen2) spell every
token with a 256-character alphabet, one character per byte, so each token id maps to a fixed
byte string. Added tokens, special (``<|endoftext|>``, ``<|im_end|>``) or not, stand for their
UTF-8 content, as ``tokenizer.decode`` spells them by default (``skip_special_tokens=False``,
which the authors' reward decode uses: a special token inside a response is part of its text).
Ids outside the table (e.g. the rows by which a model pads its embedding) stand for no text.

The decoding convention shared by the host and device rewards: the response text is the
concatenation of its tokens' bytes, decoded as UTF-8 with ``errors="replace"``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _not_byte_level(tokenizer, why: str) -> ValueError:
    return ValueError(
        f"{type(tokenizer).__name__} is not a byte-level BPE tokenizer ({why}); the token "
        "reward needs one (GPT-2-style byte-to-unicode vocabulary, as SmolLM2, Llama 3 and "
        "Qwen2 use). Score such responses on the host with reczero_jax.rewards.get_reward."
    )


def _decoder_types(decoder_state: dict) -> set[str]:
    """Types of a tokenizers decoder, looking inside ``Sequence`` decoders."""
    nested = decoder_state.get("decoders") or []
    return {decoder_state.get("type")}.union(*(_decoder_types(d) for d in nested))


@dataclass(frozen=True)
class TokenBytes:
    """Token id -> bytes, stored flat: token ``i`` is ``flat[offsets[i]:][:lengths[i]]``.

    ``flat`` uint8 [total bytes], ``offsets`` and ``lengths`` int32 [vocab size].
    """

    flat: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray

    @classmethod
    def from_token_strings(cls, token_bytes: Sequence[bytes]) -> TokenBytes:
        lengths = np.array([len(b) for b in token_bytes], dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
        flat = np.frombuffer(b"".join(token_bytes) or b"\0", dtype=np.uint8)
        return cls(flat=flat, offsets=offsets, lengths=lengths)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TokenBytes:
        """Read the table from a transformers fast tokenizer; ValueError if not byte-level BPE."""
        from tokenizers.models import BPE
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise _not_byte_level(tokenizer, "no tokenizers backend: load it with use_fast=True")
        if not isinstance(backend.model, BPE):
            raise _not_byte_level(tokenizer, f"model is {type(backend.model).__name__}, not BPE")
        decoder = backend.decoder
        decoder_types = set() if decoder is None else _decoder_types(json.loads(
            decoder.__getstate__()))
        if "ByteLevel" not in decoder_types:
            raise _not_byte_level(tokenizer, f"decoder {sorted(map(str, decoder_types))}")
        byte_of_char = {char: byte for byte, char in bytes_to_unicode().items()}
        added = {token_id: token.content.encode("utf-8")
                 for token_id, token in tokenizer.added_tokens_decoder.items()}
        vocab = backend.get_vocab(with_added_tokens=False)
        table: list[bytes] = [b""] * (max([*vocab.values(), *added, -1]) + 1)
        for spelling, token_id in vocab.items():
            if token_id in added:
                continue
            try:
                table[token_id] = bytes(byte_of_char[char] for char in spelling)
            except KeyError:
                raise _not_byte_level(
                    tokenizer, f"token {token_id} {spelling!r} is not in the byte alphabet"
                ) from None
        for token_id, content in added.items():
            table[token_id] = content
        return cls.from_token_strings(table)

    @property
    def vocab_size(self) -> int:
        return len(self.lengths)

    @property
    def max_token_bytes(self) -> int:
        return max(int(self.lengths.max(initial=0)), 1)

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            return b""
        start = self.offsets[token_id]
        return self.flat[start : start + self.lengths[token_id]].tobytes()

    def decode(self, token_ids: Sequence[int]) -> str:
        """The response text by the shared convention (token bytes joined, UTF-8, replace)."""
        joined = b"".join(self.token_bytes(int(token_id)) for token_id in token_ids)
        return joined.decode("utf-8", errors="replace")
