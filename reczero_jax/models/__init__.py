"""Llama / Qwen2 decoder (Flax NNX) and its Hugging Face interop."""

from reczero_jax.models.config import ModelConfig
from reczero_jax.models.decoder import Decoder, KVCache, Prefix
from reczero_jax.models.hf import from_pretrained, save_pretrained, stop_token_ids

__all__ = ["Decoder", "KVCache", "ModelConfig", "Prefix", "from_pretrained", "save_pretrained",
           "stop_token_ids"]
