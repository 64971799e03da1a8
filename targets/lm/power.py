"""Power-SMC: sample whole sequences from p(y | x)^alpha (reference.md section 5).

The target
----------
A sequence ``y`` is what the LM generates after the prompt ``x``, stopped at its first EOS or cut
after ``T = max_new_tokens`` tokens. ``p(y)`` is the product of its token probabilities: for a
sequence ending with EOS that includes the EOS factor; for a sequence cut at ``T`` it is the
probability of its ``T``-token prefix (no EOS factor). These probabilities sum to one over the
support ``S_T`` (EOS-terminated sequences of at most ``T`` tokens plus EOS-free ``T``-token ones),
and the target is

    pi_alpha(y) = p(y)^alpha / Z,   Z = sum_{y in S_T} p(y)^alpha,   for y in S_T.

With ``forced_eos=True`` the ``T``-th token is EOS whenever the sequence has not ended: the support
becomes the EOS-terminated sequences of at most ``T`` tokens (EOS included in the count) and
``pi_alpha`` is p(y)^alpha restricted to them (the forced EOS enters through its model probability
p(EOS | y_<T)^alpha, so sequences the model would not end there are down-weighted, not favoured).

With ``top_k`` / ``top_p`` filters the proposal can only produce sequences whose every token lies in
the filter set computed at its step (top-k of p(. | y_<t); the nucleus of the *tempered*
distribution p^{beta_t} at that step, so it depends on the proposal exponent). The target becomes
p(y)^alpha restricted to that set of sequences (and Z its sum over the set); weights use the
filtered, renormalised q, so the result is exact for that restricted target.

The Feynman-Kac model
---------------------
Exponent schedule ``a_t`` for a prefix of ``t`` tokens: ``a_t = 1 + (alpha - 1) min(t / R, 1)``
for a ramp length ``R >= 1`` (bridging), or ``a_t = alpha`` for every t when ``R = 0``.
Intermediate target after ``t`` steps: ``gamma_t(y_1:t) = p(y_1:t)^{a_t}`` on unfinished prefixes
and ``gamma_t(y) = p(y)^alpha`` on sequences that finished at any step ``s <= t``; gamma_0 = 1 on
the empty prefix, so log Z_hat estimates log sum_y gamma_T(y) = log Z exactly (Z_hat is unbiased).

Step t (token ``y_t`` given the prefix ``y_<t`` of ``t - 1`` tokens; proposal exponent ``b_t``,
``b_t = a_t`` unless ``proposal_alpha`` fixes it): ``q_t(v) = p(v | y_<t)^{b_t} / C_t`` with
``C_t = sum_v p(v | y_<t)^{b_t}`` (then filtered and renormalised if asked). The incremental weight
is gamma_t / (gamma_{t-1} q_t):

    log G_t = (a_t - a_{t-1}) log p(y_<t) + a_t log p(y_t | y_<t) - log q_t(y_t)
              [ + (alpha - a_t) log p(y_1:t)   if y ends at this step: EOS, cut at T or forced EOS ]

When ``q_t`` is the unfiltered ``p^{a_t} / C_t`` the middle terms equal ``log C_t`` =
``logsumexp_v a_t log p(v | y_<t)``, independent of the sampled token, which gives the Power-SMC
weight ``(a_t - a_{t-1}) log p(y_<t) + log sum_v p(v | y_<t)^{a_t}``; that is what is computed
then (exactly, not through the sampled token). Wherever the proposal's exponent differs from the
target's ``a_t`` (a fixed ``proposal_alpha``, a filter, or the forced EOS where q is a point mass
with ``log q = 0``) the general form above is used. The bracketed term is the bridging correction:
a sequence that ends while ``a_t < alpha`` (or ``> alpha``) is raised to the final exponent.
Finished rows are frozen: no tokens (they are fed at position ``max_len``, which writes nothing to
the cache), zero increments. The engine stops when every row has finished.

Particles carry the LM cache, so resampling gathers the KV cache with the ancestors.
"""
from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

import smc
from proposals.tokens import filtered_logprobs

Array = jax.Array


class PowerParticles(NamedTuple):
    """One Power-SMC particle per row (leading axis N)."""

    cache: Any          # the LM's cache (KV cache for a Llama), gathered on resampling
    logprobs: Array     # [N, V] log p(. | prefix): the next-token distribution
    tokens: Array       # [N, T] generated tokens, EOS-padded after a row stops
    length: Array       # [N] int32 generated tokens (EOS included)
    done: Array         # [N] bool: stopped (EOS, cut at T or forced EOS)
    eos: Array          # [N] bool: ended with an EOS token
    logp: Array         # [N] log p(y_1:t) of the generated tokens


class PowerResult(NamedTuple):
    """All weighted sequences of a Power-SMC run (no cache). ``weights`` = softmax(log_weights)."""

    tokens: Array           # [N, T]
    length: Array           # [N]
    eos: Array              # [N] ended with EOS (False: cut at T)
    logp: Array             # [N] log p(y)
    log_weights: Array      # [N]
    log_evidence: Array     # log Z_hat, Z_hat unbiased for sum_y p(y)^alpha over the support
    ess: Array              # [T + 1] ESS trace
    resampled: Array        # [T] resampled before step t
    num_steps: Array        # steps taken
    nan_increments: Any = None  # [T + 1] particles with a NaN increment per step (engine trace)

    @property
    def weights(self) -> Array:
        """Normalised over the last axis, so that it also works on vmapped results [..., N]."""
        total = logsumexp(self.log_weights, axis=-1, keepdims=True)
        dead = jnp.isneginf(total)
        return jnp.where(dead, 0.0, jnp.exp(self.log_weights - jnp.where(dead, 0.0, total)))


# ----------------------------------------------------------------------------- validation
def _static_real(name: str, value: Any) -> float:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python number, not a traced value")
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def _static_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_prompt(lm, prompt, prompt_length, max_new_tokens: int):
    """Returns (prompt [P] int32, prompt_length int32 scalar); raises before any generation."""
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 1:
        raise ValueError(f"prompt must be a 1-D token array [P] (vmap for several prompts), "
                         f"got shape {prompt.shape}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"prompt must hold integer token ids, got {prompt.dtype}")
    width = prompt.shape[0]
    if width == 0:
        raise ValueError("empty prompt: Power-SMC needs at least one prompt token (e.g. BOS)")
    if width + max_new_tokens > lm.max_len:
        raise ValueError(f"prompt width {width} + max_new_tokens {max_new_tokens} exceeds the "
                         f"cache length max_len {lm.max_len}")
    if prompt_length is None:
        prompt_length = width
    if not isinstance(prompt_length, jax.core.Tracer):
        value = np.asarray(prompt_length)
        if value.shape != () or not 1 <= int(value) <= width:
            raise ValueError(f"prompt_length must be a scalar in [1, {width}], got {prompt_length}")
    return prompt.astype(jnp.int32), jnp.asarray(prompt_length, jnp.int32)


def exponent_schedule(alpha: float, ramp_length: int):
    """``a(t)`` for a prefix of t tokens: linear ramp 1 -> alpha over ``ramp_length`` tokens."""
    if ramp_length == 0:
        return lambda t: jnp.asarray(alpha, jnp.float32)
    return lambda t: 1.0 + (alpha - 1.0) * jnp.minimum(
        jnp.asarray(t, jnp.float32) / ramp_length, 1.0)


# ----------------------------------------------------------------------------- shared pieces
def init_particles(lm, params, prompt, prompt_length, n: int, T: int, eos: int) -> PowerParticles:
    """N particles holding the prompt's cache and next-token distribution, nothing generated."""
    cache, logprobs = lm.prefill(params, prompt[None, :], prompt_length[None])
    cache, logprobs = jax.tree_util.tree_map(
        lambda x: jnp.broadcast_to(x, (n,) + x.shape[1:]), (cache, logprobs))
    return PowerParticles(
        cache=cache, logprobs=logprobs.astype(jnp.float32),
        tokens=jnp.full((n, T), eos, jnp.int32), length=jnp.zeros((n,), jnp.int32),
        done=jnp.zeros((n,), bool), eos=jnp.zeros((n,), bool),
        logp=jnp.zeros((n,), jnp.float32))


def propose_token(key, particles: PowerParticles, logq_all, t, T: int, forced_eos: bool, eos: int):
    """Token ``y_t`` (0-based position t) of every row from ``logq_all`` [N, V].

    Forced EOS at ``t = T - 1`` (point mass, ``log q = 0``); finished rows get EOS.
    Returns ``(tok, logq, lp_tok, forced, ends)``: ``lp_tok = log p(tok | prefix)`` and ``ends``
    (EOS, cut at T or forced EOS).
    """
    live = ~particles.done
    tok = jax.random.categorical(key, logq_all, axis=-1).astype(jnp.int32)
    logq = jnp.take_along_axis(logq_all, tok[:, None], axis=-1)[:, 0]
    forced = jnp.asarray(False)
    if forced_eos:
        forced = t == T - 1  # the proposal is the point mass on EOS, whatever q_t drew
        tok = jnp.where(forced, eos, tok)
        logq = jnp.where(forced, 0.0, logq)
    tok = jnp.where(live, tok, eos)
    lp_tok = jnp.take_along_axis(particles.logprobs, tok[:, None], axis=-1)[:, 0]
    ends = (tok == eos) | (t + 1 >= T)
    return tok, logq, lp_tok, forced, ends


def advance(lm, params, particles: PowerParticles, tok, lp_tok, ends, t, prompt_length, eos: int,
            live=None) -> PowerParticles:
    """Append ``tok`` at position t to the ``live`` rows (default: unfinished); others frozen.

    Frozen rows are fed at position ``max_len``, which writes nothing to the cache.
    """
    live = ~particles.done if live is None else live
    position = jnp.where(live, prompt_length + t, lm.max_len)
    cache, next_logprobs = lm.decode(params, particles.cache, tok, position)
    return PowerParticles(
        cache=cache,
        logprobs=jnp.where(live[:, None], next_logprobs.astype(jnp.float32), particles.logprobs),
        tokens=particles.tokens.at[:, t].set(tok),
        length=particles.length + live.astype(jnp.int32),
        done=particles.done | (live & ends),
        eos=particles.eos | (live & (tok == eos)),
        logp=jnp.where(live, particles.logp + lp_tok, particles.logp))


# ----------------------------------------------------------------------------- the model
def power_feynman_kac(lm, params, prompt, *, alpha: float, max_new_tokens: int,
                      prompt_length=None, ramp_length: int = 0, forced_eos: bool = False,
                      proposal_alpha: float | None = None, top_k: int | None = None,
                      top_p: float | None = None, eos_id: int | None = None,
                      ) -> smc.FeynmanKac:
    """The Feynman-Kac model of Power-SMC for one prompt (module docstring: target and weights).

    ``lm`` has the language-model interface (``prefill``, ``decode``, ``max_len``, ``eos_id``);
    ``prompt`` is a 1-D token array, right-padded to a width with ``prompt_length`` real tokens
    (may be traced, so that ``jax.vmap`` runs several prompts). ``alpha > 0`` is static.
    ``ramp_length = 0``: no bridging. ``proposal_alpha``: a fixed proposal exponent instead of a_t.
    """
    alpha = _static_real("alpha", alpha)
    T = _static_int("max_new_tokens", max_new_tokens, 1)
    ramp_length = _static_int("ramp_length", ramp_length, 0)
    if proposal_alpha is not None:
        proposal_alpha = _static_real("proposal_alpha", proposal_alpha)
    if top_k is not None:
        top_k = _static_int("top_k", top_k, 1)
    if top_p is not None:
        top_p = float(top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    prompt, prompt_length = check_prompt(lm, prompt, prompt_length, T)
    eos = lm.eos_id if eos_id is None else eos_id
    if eos is None:
        raise ValueError("the model has no eos_id; pass eos_id")
    exponent = exponent_schedule(alpha, ramp_length)
    # q_t = p^{a_t} / C_t exactly: the token-independent log C_t form of the weight applies.
    exact_form = proposal_alpha is None and top_k is None and top_p is None

    def init(key, n):
        del key
        return (init_particles(lm, params, prompt, prompt_length, n, T, eos),
                jnp.zeros((n,), jnp.float32))

    def step(key, particles: PowerParticles, t):
        a_prev, a_t = exponent(t), exponent(t + 1)
        b_t = a_t if proposal_alpha is None else jnp.asarray(proposal_alpha, jnp.float32)
        logprobs = particles.logprobs
        live = ~particles.done
        logq_all = filtered_logprobs(logprobs, 1.0 / b_t, top_k, top_p)
        tok, logq, lp_tok, forced, ends = propose_token(key, particles, logq_all, t, T,
                                                        forced_eos, eos)
        if exact_form:
            token_term = logsumexp(a_t * logprobs, axis=-1)          # log C_t
            if forced_eos:
                token_term = jnp.where(forced, a_t * lp_tok, token_term)
        else:
            token_term = a_t * lp_tok - logq
        new_logp = particles.logp + lp_tok
        # bridging: raise a sequence that ends before the ramp does to the final exponent
        # (guarded so that 0 * -inf never makes a NaN)
        bridge = jnp.where(ends & (a_t != alpha), (alpha - a_t) * new_logp, 0.0)
        increment = (a_t - a_prev) * particles.logp + token_term + bridge
        increment = jnp.where(live, increment, 0.0)
        new = advance(lm, params, particles, tok, lp_tok, ends, t, prompt_length, eos)
        return new, increment

    def done(particles: PowerParticles):
        return jnp.all(particles.done)

    return smc.FeynmanKac(init=init, step=step, num_steps=T, done=done)


def power_smc(key, lm, params, prompt, *, alpha: float, num_particles: int, max_new_tokens: int,
              prompt_length=None, ramp_length: int = 0, forced_eos: bool = False,
              proposal_alpha: float | None = None, top_k: int | None = None,
              top_p: float | None = None, eos_id: int | None = None,
              resampling=smc.resampling.systematic, ess_threshold: float = 0.5) -> PowerResult:
    """Run Power-SMC for one prompt; returns every weighted sequence (see `draw`).

    Pure in ``key``; jit it with the static arguments bound (``functools.partial``) and
    ``jax.vmap`` it over keys or over (prompt, prompt_length) for several prompts.
    """
    model = power_feynman_kac(lm, params, prompt, alpha=alpha, max_new_tokens=max_new_tokens,
                              prompt_length=prompt_length, ramp_length=ramp_length,
                              forced_eos=forced_eos, proposal_alpha=proposal_alpha, top_k=top_k,
                              top_p=top_p, eos_id=eos_id)
    result = smc.run(key, model, num_particles, resampling=resampling, ess_threshold=ess_threshold)
    p = result.particles
    return PowerResult(tokens=p.tokens, length=p.length, eos=p.eos, logp=p.logp,
                       log_weights=result.log_weights, log_evidence=result.log_evidence,
                       ess=result.ess, resampled=result.resampled, num_steps=result.num_steps,
                       nan_increments=result.nan_increments)


def draw(key, result: PowerResult):
    """One sequence drawn by weight: ``(tokens [T], length)`` (a sample of pi_alpha as N grows)."""
    index = jax.random.categorical(key, result.log_weights)
    return result.tokens[index], result.length[index]
