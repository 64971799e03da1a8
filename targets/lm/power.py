"""Power-SMC: sample whole sequences from p(y | x)^alpha (docs/algorithms.md section 5).

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
Finished rows are frozen (`targets.lm.decoding`): no tokens, zero increments. The engine stops
when every row has finished.

Particles are `decoding.SequenceState` rows; each carries the cache of its own tokens, so
resampling gathers that with the ancestors; the prompt's cache is computed once when the model is
built and shared by every particle (`decoding.Prefilled`).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

import smc
from proposals.tokens import filtered_logprobs
from smc.validation import static_bool, static_int, static_positive
from targets.lm import decoding
from targets.lm.decoding import SequenceState

Array = jax.Array


def exponent_schedule(alpha: float, ramp_length: int):
    """``a(t)`` for a prefix of t tokens: linear ramp 1 -> alpha over ``ramp_length`` tokens."""
    if ramp_length == 0:
        return lambda t: jnp.asarray(alpha, jnp.float32)
    return lambda t: 1.0 + (alpha - 1.0) * jnp.minimum(
        jnp.asarray(t, jnp.float32) / ramp_length, 1.0)


def power_model(lm, params, prompt, *, alpha: float, max_new_tokens: int, prompt_length=None,
                ramp_length: int = 0, forced_eos: bool = False,
                proposal_alpha: float | None = None, top_k: int | None = None,
                top_p: float | None = None, eos_ids: int | Sequence[int] | None = None,
                resample_every: int = 1, distinct_rows: bool = False) -> smc.FeynmanKac:
    """The Feynman-Kac model of Power-SMC (module docstring: target and weights).

    ``lm`` is a `targets.lm.protocol.LanguageModel`. ``prompt``: one prompt, a 1-D token array
    right-padded to a width with ``prompt_length`` real tokens (may be traced); or B prompts
    [B, P] with ``prompt_length`` [B] (default P each): then a model of B groups
    (`smc.FeynmanKac.groups`), N particles per prompt, every prompt weighted and resampled on
    its own while one decode call serves all B x N rows; `smc.run` returns results [B, ...],
    equal to B runs of the one-prompt model with the same keys. ``alpha > 0`` is static.
    ``ramp_length = 0``: no bridging. ``proposal_alpha``: a fixed proposal exponent instead of
    a_t. ``eos_ids``: the tokens that end a sequence, any of them (default the model's; the first
    is the forced one; see `decoding.resolve_eos`). ``resample_every = k``: the ESS is tested
    (and resampling may happen) only before tokens 1, k + 1, 2k + 1, ... (the Power-SMC paper
    tests it every 64 tokens); the weights are exact either way. ``distinct_rows``: run the
    model on one row per distinct unfinished sequence (`targets.lm.distinct`; same results, less
    work when resampling leaves copies).
    """
    alpha = static_positive("alpha", alpha)
    T = static_int("max_new_tokens", max_new_tokens, 1)
    ramp_length = static_int("ramp_length", ramp_length, 0)
    resample_every = static_int("resample_every", resample_every, 1)
    if proposal_alpha is not None:
        proposal_alpha = static_positive("proposal_alpha", proposal_alpha)
    if top_k is not None:
        top_k = static_int("top_k", top_k, 1)
    if top_p is not None:
        top_p = static_positive("top_p", top_p)
        if top_p > 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    prompts, prompt_lengths, groups = decoding.check_prompt_or_prompts(lm, prompt, prompt_length,
                                                                       T)
    eos = decoding.resolve_eos(lm, eos_ids, forced_eos)
    distinct_rows = static_bool("distinct_rows", distinct_rows)
    exponent = exponent_schedule(alpha, ramp_length)
    # q_t = p^{a_t} / C_t exactly: the token-independent log C_t form of the weight applies.
    exact_form = proposal_alpha is None and top_k is None and top_p is None
    # the prompts run once, here; their caches are shared by the particles, never resampled
    prefilled = decoding.prefill(lm, params, prompts, prompt_lengths)

    def init(key, n):
        del key
        state = decoding.start(lm, prefilled, max_new_tokens=T, eos_ids=eos, copies=n)
        return state, jnp.zeros((state.length.shape[0],), jnp.float32)

    def step(key, state: SequenceState, t):
        a_prev, a_t = exponent(t), exponent(t + 1)
        b_t = a_t if proposal_alpha is None else jnp.asarray(proposal_alpha, jnp.float32)
        live = ~state.done
        logq_all = filtered_logprobs(state.logprobs, 1.0 / b_t, top_k, top_p)
        tokens, logq, forced = decoding.draw_token(key, state, logq_all, eos, forced_eos,
                                                   groups=groups)
        lp_token = decoding.token_logprob(state, tokens)
        new = decoding.append(lm, params, prefilled, state, tokens, logq, eos,
                              distinct_rows=distinct_rows)
        if exact_form:
            token_term = logsumexp(a_t * state.logprobs, axis=-1)          # log C_t
            token_term = jnp.where(forced, a_t * lp_token, token_term)
        else:
            token_term = a_t * lp_token - logq
        # bridging: raise a sequence that ends before the ramp does to the final exponent
        # (guarded so that 0 * -inf never makes a NaN)
        ends = live & new.done
        bridge = jnp.where(ends & (a_t != alpha), (alpha - a_t) * new.logp, 0.0)
        increment = (a_t - a_prev) * state.logp + token_term + bridge
        return new, jnp.where(live, increment, 0.0)

    def done(state: SequenceState):
        return state.done

    mask = None if resample_every == 1 else np.arange(T) % resample_every == 0
    return smc.FeynmanKac(init=init, step=step, num_steps=T, done=done, resample_mask=mask,
                          groups=groups)


def power_smc(key, lm, params, prompt, *, alpha: float, num_particles: int, max_new_tokens: int,
              prompt_length=None, ramp_length: int = 0, forced_eos: bool = False,
              proposal_alpha: float | None = None, top_k: int | None = None,
              top_p: float | None = None, eos_ids: int | Sequence[int] | None = None,
              resample_every: int = 1, distinct_rows: bool = False,
              resampling=smc.resampling.systematic, ess_threshold: float = 0.5) -> smc.SMCResult:
    """Run Power-SMC: an `smc.SMCResult` whose particles are the weighted sequences
    (`decoding.SequenceState` without the cache; `decoding.draw` picks one).

    One prompt [P], or B prompts [B, P] in one program (`power_model`; every field of the
    result then has a leading [B] axis, and ``key`` is one key or B keys, one per prompt).
    Pure in ``key``; jit it with the static arguments bound (``functools.partial``). B prompts
    in one call beat ``jax.vmap`` over prompts: under ``vmap`` the engine's "resample or not"
    becomes a select, so every prompt's cache is gathered at every step.
    """
    model = power_model(lm, params, prompt, alpha=alpha, max_new_tokens=max_new_tokens,
                        prompt_length=prompt_length, ramp_length=ramp_length,
                        forced_eos=forced_eos, proposal_alpha=proposal_alpha, top_k=top_k,
                        top_p=top_p, eos_ids=eos_ids, resample_every=resample_every,
                        distinct_rows=distinct_rows)
    result = smc.run(key, model, num_particles, resampling=resampling, ess_threshold=ess_threshold)
    return result._replace(particles=decoding.without_cache(result.particles))
