"""Group sampler: shared vs naive prompt, sampler vs trainer log-probs, filtering, EOS, buckets,
mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from reczero_jax import mesh as meshlib
from reczero_jax import sampling
from reczero_jax.policy import response_logprobs
from reczero_jax.sampling import choose_tokens, first_argmax, generate
from tests.helpers import left_padded_prompts, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_shared_and_naive_paths_sample_identically(model):
    ids, mask = left_padded_prompts()
    kwargs = dict(num_samples=4, max_new_tokens=12, rng=jax.random.key(7), eos_ids=())
    shared = generate(model, ids, mask, **kwargs)
    naive = generate(model, ids, mask, shared_prompt=False, **kwargs)
    np.testing.assert_array_equal(shared.tokens, naive.tokens)
    np.testing.assert_allclose(shared.logprobs, naive.logprobs, atol=1e-5)
    assert shared.tokens.shape == (2, 4, 12)
    # The G samples of a prompt differ, and the same key reproduces them.
    assert len({tuple(s) for s in np.asarray(shared.tokens[0])}) > 1
    again = generate(model, ids, mask, **kwargs)
    np.testing.assert_array_equal(shared.tokens, again.tokens)


def test_sampler_logprobs_equal_training_forward(model):
    ids, mask = left_padded_prompts()
    out = generate(model, ids, mask, num_samples=3, max_new_tokens=10, temperature=0.7,
                   rng=jax.random.key(3), eos_ids=())
    for shared in (True, False):
        trained = response_logprobs(model, jnp.asarray(ids), jnp.asarray(mask), out.tokens,
                                    temperature=0.7, shared_prompt=shared)
        np.testing.assert_allclose(out.logprobs, trained, atol=1e-5)


def test_greedy_is_argmax_of_training_forward(model):
    ids, mask = left_padded_prompts()
    out = generate(model, ids, mask, num_samples=2, max_new_tokens=8, temperature=0.0,
                   rng=jax.random.key(0), eos_ids=())
    np.testing.assert_array_equal(out.tokens[:, 0], out.tokens[:, 1])
    logits = model(jnp.concatenate([jnp.asarray(ids), out.tokens[:, 0]], axis=1),
                   attention_mask=jnp.concatenate([jnp.asarray(mask),
                                                   jnp.ones((2, 8), jnp.int32)], axis=1))
    np.testing.assert_array_equal(jnp.argmax(logits[:, ids.shape[1] - 1:-1], -1), out.tokens[:, 0])


def test_first_argmax_is_argmax_on_ties_infinities_and_nans():
    rows = np.random.default_rng(0).standard_normal((6, 50)).astype(np.float32)
    rows[1, [3, 7, 40]] = 9.0  # ties: the first wins
    rows[2, :] = -np.inf  # every token filtered out
    rows[3, [5, 20]] = np.nan  # a NaN counts as the largest, the first one wins
    rows[4, 10] = np.inf
    rows[5, [0, 49]] = 9.0
    for x in (rows, rows.reshape(2, 3, 50)):
        np.testing.assert_array_equal(jax.jit(first_argmax)(jnp.asarray(x)), np.argmax(x, axis=-1))


def test_sampled_tokens_are_the_gumbel_argmax_of_the_logprobs():
    """The sampler's draw is exactly argmax(log_softmax(logits / T) + Gumbel(key)), the
    token-for-token reference of the random streams (keys folded per step, row, sample)."""
    logits = 3.0 * jax.random.normal(jax.random.key(1), (2, 4, 1000))
    keys = sampling.sample_keys(jax.random.key(9), jnp.int32(5), 2, 4)
    tokens, logp = jax.jit(choose_tokens, static_argnums=(2, 3, 4))(logits, keys, 0.7, 0, 1.0)
    reference_logp = jax.nn.log_softmax(logits / 0.7, axis=-1)
    gumbel = jax.vmap(jax.vmap(lambda k: jax.random.gumbel(k, (1000,))))(keys)
    reference = jnp.argmax(reference_logp + gumbel, axis=-1)
    np.testing.assert_array_equal(tokens, reference)
    # The same maths compiled in another program: XLA may sum the softmax in another order.
    np.testing.assert_allclose(logp, jnp.take_along_axis(reference_logp, reference[..., None],
                                                         -1)[..., 0], rtol=1e-6, atol=0)


def test_top_k_and_top_p_never_leave_the_allowed_set():
    logits = jnp.log(jnp.asarray([0.4, 0.3, 0.15, 0.1, 0.05]))[None, None]
    keys = jax.random.split(jax.random.key(0), 4000).reshape(4000, 1)
    logits = jnp.broadcast_to(logits, (4000, 1, 5))
    top_k, _ = choose_tokens(logits, keys, 1.0, top_k=2, top_p=1.0)
    assert set(np.unique(top_k)) == {0, 1}
    # Nucleus 0.8: 0.4 + 0.3 < 0.8 so token 2 is needed; token 3 (cumulative before = 0.85) is not.
    top_p, logp = choose_tokens(logits, keys, 1.0, top_k=0, top_p=0.8)
    assert set(np.unique(top_p)) == {0, 1, 2}
    frequency = np.bincount(np.asarray(top_p).ravel(), minlength=5) / 4000
    np.testing.assert_allclose(frequency[:3], np.array([0.4, 0.3, 0.15]) / 0.85, atol=0.03)
    np.testing.assert_allclose(np.exp(logp[:, 0]), np.array([0.4, 0.3, 0.15])[top_p[:, 0]] / 0.85,
                               rtol=1e-5)


def test_eos_ends_a_sample_and_pads_after_it(model):
    ids, mask = left_padded_prompts()
    free = generate(model, ids, mask, num_samples=4, max_new_tokens=12, rng=jax.random.key(5),
                    eos_ids=())
    eos = int(free.tokens[0, 0, 4])  # make the token sampled at step 4 of (0, 0) an EOS
    out = generate(model, ids, mask, num_samples=4, max_new_tokens=12, rng=jax.random.key(5),
                   eos_ids=(eos,), pad_id=0)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for b in range(2):
        for g in range(4):
            hits = np.flatnonzero(np.asarray(free.tokens[b, g]) == eos)
            expected = hits[0] + 1 if hits.size else 12
            assert lengths[b, g] == expected
            assert bool(out.finished_by_eos[b, g]) == bool(hits.size)
            np.testing.assert_array_equal(tokens[b, g, :expected], free.tokens[b, g, :expected])
            assert (tokens[b, g, expected:] == 0).all()
            assert (np.asarray(out.logprobs[b, g, expected:]) == 0).all()
    assert lengths[0, 0] == 5


def test_prompt_lengths_share_a_bucket_and_compile_once(model):
    sampling._prefill.clear_cache()
    sampling._decode.clear_cache()
    for length in (10, 23, 40, 64):
        ids, mask = left_padded_prompts(length=length)
        generate(model, ids, mask, num_samples=2, max_new_tokens=4, rng=jax.random.key(0),
                 eos_ids=())
    assert sampling._prefill._cache_size() == 1
    assert sampling._decode._cache_size() == 1
    ids, mask = left_padded_prompts(length=65)
    generate(model, ids, mask, num_samples=2, max_new_tokens=4, rng=jax.random.key(0), eos_ids=())
    assert sampling._prefill._cache_size() == 2


def test_mesh_gives_the_same_greedy_output():
    ids, mask = left_padded_prompts(batch=4)
    kwargs = dict(num_samples=2, max_new_tokens=8, temperature=0.0, rng=jax.random.key(0),
                  eos_ids=())
    reference = generate(tiny_model(), ids, mask, **kwargs)
    mesh = meshlib.make_mesh(data=2, fsdp=2, tensor=2)
    sharded_model = meshlib.shard_model(tiny_model(mesh=mesh), mesh)
    sharded = generate(sharded_model, ids, mask, **kwargs)
    np.testing.assert_array_equal(reference.tokens, sharded.tokens)
    np.testing.assert_allclose(reference.logprobs, sharded.logprobs, atol=1e-5)
    assert sharded_model.layers.wq[...].sharding.spec == meshlib.logical_to_spec(
        ("layers", "embed", "heads", "head_dim"))
    expected = NamedSharding(mesh, meshlib.logical_to_spec(("batch", None, None)))
    assert sharded.tokens.sharding.is_equivalent_to(expected, 3)
