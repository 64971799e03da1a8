"""The shared prompt cache and chunked prefill, on the shipped SmolLM2.

A prompt's keys and values are stored once (`decoding.Prefilled`) and every row that continues it
holds only its own tokens; attention merges the two parts exactly (one softmax over both blocks,
`transformer.softmax_blocks`). Checked three ways on prompts of 1, 37 and 700 tokens:
- one prompt shared by 3 rows gives the same tokens (same key) and log-probabilities as the prompt
  copied into 3 prompts of one row each (what the old per-row cache did);
- both equal a full causal recomputation (`forward` over prompt + tokens; 1 and 37 tokens);
- prefill in chunks of 256 positions equals prefill in one chunk.
And Power-SMC resampling at every one of 12 steps keeps every particle's log p equal to the full
recomputation: particles that share a prompt stay right however often they are resampled, also
when the model runs on the distinct rows only (`distinct_rows`: each copy is handed its
representative's cache).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gguf")
from smollm2 import needs_model

NEW = 6
MAX_LEN = 704 + NEW


@pytest.fixture(scope="module")
def lm():
    from targets.lm.load import load
    model, params, _ = load(max_len=MAX_LEN, scan_layers=True)  # scan: quick to compile
    return dataclasses.replace(model, prefill_chunk=256), params


def prompt_of(length: int) -> jnp.ndarray:
    ids = np.random.default_rng(length).integers(0, 49152, size=length)
    ids[0] = 1  # <|im_start|>
    return jnp.asarray(ids, jnp.int32)


def sampled(model, params, prompt, rows, shared, key):
    """NEW tokens for each of `rows` rows continuing `prompt`, sampled from the model
    (temperature 1): (tokens, per-step log-probabilities, the Prefilled). ``shared``: one prompt
    cache for every row; else the prompt cache is copied into one prompt per row, as the
    per-row cache did before it was shared."""
    from targets.lm import decoding
    prefilled = decoding.prefill(model, params, prompt[None], jnp.asarray([prompt.size]))
    if not shared:
        prefilled = jax.tree.map(lambda x: jnp.repeat(x, rows, axis=0), prefilled)
    state = decoding.start(model, prefilled, max_new_tokens=NEW, eos_ids=(-1,),
                           copies=rows if shared else 1)
    steps = []
    for i in range(NEW):
        steps.append(state.logprobs)
        tokens = jax.random.categorical(jax.random.fold_in(key, i), state.logprobs)
        state = decoding.append(model, params, prefilled, state, tokens.astype(jnp.int32),
                                jnp.zeros(tokens.shape), (-1,))
    return state.tokens, jnp.stack(steps, axis=1), prefilled   # [N, NEW], [N, NEW, V]


@needs_model
@pytest.mark.parametrize("length", [1, 37, 700])
def test_shared_prompt_equals_copies_and_full_recomputation(lm, length):
    model, params = lm
    prompt = prompt_of(length)
    key = jax.random.PRNGKey(length)
    run = jax.jit(functools.partial(sampled, model), static_argnums=(2, 3))
    tokens, steps, prefilled = run(params, prompt, 3, True, key)
    copied_tokens, copied_steps, copied = run(params, prompt, 3, False, key)
    # the prompt is stored once; each row's own cache has NEW positions, not max_len
    assert prefilled.prompt_cache["k"][0].shape == (1, 3, length, 64)
    assert copied.prompt_cache["k"][0].shape == (3, 3, length, 64)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(copied_tokens))
    # the two differ only in how the attention products are batched, which reorders float32
    # sums over 30 layers: relative differences up to 4.3e-6 observed; a wrong merge or mask
    # is off by O(1)
    np.testing.assert_allclose(np.asarray(steps), np.asarray(copied_steps), rtol=1e-5)
    # full recomputation of two rows: the log-probabilities after the prompt and each token;
    # one pass over other shapes rounds differently (2e-4, as tests/test_lm_llama.py's
    # cache-versus-recomputation test). Not at 700 tokens, to save the suite ~20 s: the merge is
    # the same code at every length, and test_chunked_prefill_equals_one_chunk checks the long
    # prefill itself.
    if length > 256:
        return
    full = jnp.concatenate([jnp.tile(prompt, (2, 1)), tokens[:2, :NEW - 1]], axis=1)
    recomputed = jax.nn.log_softmax(jax.jit(model.forward)(params, full), axis=-1)[:, length - 1:]
    np.testing.assert_allclose(np.asarray(steps[:2]), np.asarray(recomputed), rtol=0, atol=2e-4)


@needs_model
def test_chunked_prefill_equals_one_chunk(lm):
    model, params = lm
    prompt = prompt_of(700)[None]
    lengths = jnp.asarray([700], jnp.int32)
    chunked = jax.jit(model.prefill)(params, prompt, lengths)
    whole = jax.jit(dataclasses.replace(model, prefill_chunk=1024).prefill)(params, prompt, lengths)
    # float32 reassociation only (other matrix shapes): relative 1.2e-6 observed
    np.testing.assert_allclose(np.asarray(chunked[1]), np.asarray(whole[1]), rtol=1e-5)
    for name in ("k", "v"):
        for a, b in zip(chunked[0][name], whole[0][name]):
            b = np.asarray(b)
            np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-5 * np.abs(b).max())


@needs_model
@pytest.mark.parametrize("distinct_rows", [False, True])
def test_particles_sharing_a_prompt_stay_right_through_many_resamplings(lm, distinct_rows):
    import smc
    from targets.lm.power import power_model
    model, params = lm
    prompt, T, N = prompt_of(37), 12, 8
    result = jax.jit(lambda k, p: smc.run(
        k, power_model(model, p, prompt, alpha=4.0, max_new_tokens=T, eos_ids=-1,
                       distinct_rows=distinct_rows), N,
        ess_threshold=1.0, record_ancestors=True))(jax.random.PRNGKey(3), params)
    steps = int(result.num_steps)
    assert steps == T and bool(np.all(np.asarray(result.resampled)[:steps]))
    ancestors = np.asarray(result.ancestors)[:steps]
    assert any(len(set(a.tolist())) < N for a in ancestors)  # copies were really made
    tokens = np.asarray(result.particles.tokens)
    full = jnp.concatenate([jnp.tile(prompt, (N, 1)), jnp.asarray(tokens)], axis=1)
    logp = jax.nn.log_softmax(jax.jit(model.forward)(params, full), axis=-1)
    expected = [sum(float(logp[i, 36 + j, tokens[i, j]]) for j in range(T)) for i in range(N)]
    # 12 log-probabilities summed, each within ~1e-4 of the recomputation (float32)
    np.testing.assert_allclose(np.asarray(result.particles.logp), expected, rtol=0, atol=2e-3)
