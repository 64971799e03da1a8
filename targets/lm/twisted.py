"""Reward-twisted SMC: sample sequences from Pi(y) ~ p(y | x) phi(y) (docs/algorithms.md section 6).

The target
----------
The support ``S_T`` is, by default (``forced_eos=True``), the sequences that end with an EOS
within T tokens: an answer is expected to finish within its budget (genlm-control's default too).
The T-th token is then a forced EOS (a point mass, its probability in the weight). With
``forced_eos=False`` it is that of `targets.lm.power`: EOS-terminated sequences of at most T
tokens plus EOS-free T-token ones (cut at the limit). Then

    Pi(y) = p(y) phi(y) / Z,   Z = sum_{y in S_T} p(y) phi(y),

with ``phi = exp(complete)`` of a `targets.lm.potentials.Potential` (e.g. exp(lambda r(y)) for a
terminal reward ``potentials.terminal(r, lambda)``).

The Feynman-Kac model (prefix-only twisting)
--------------------------------------------
Intermediate target after s tokens: ``gamma_s(y_1:s) = p(y_1:s) psi(y_1:s)`` on unfinished
prefixes, ``p(y) phi(y)`` on sequences finished at any step ``<= s``; ``gamma_0 = psi(empty)``
(the initial weight), so Z_hat is unbiased for Z. Token s is drawn from ``q = p^{1/tau}``
(renormalised; ``tau = 1`` is the model itself) and its incremental weight is

    log G = log p(y_s | y_<s) - log q(y_s | y_<s) + log psi(y_1:s) - log psi(y_<s)

except when the sequence ends (EOS, cut at T, forced EOS), where the last prefix potential is
replaced by the complete one: ``log phi(y) - log psi(y_<s)``. A forced EOS is a point mass
(``log q = 0``), so its weight carries ``log p(EOS | y_<T)``. Finished rows are frozen (no tokens,
zero increments); a row whose prefix potential is already -inf keeps weight -inf (its increments are
0, never -inf - -inf = NaN); a NaN potential gives a NaN increment, counted by the engine
(``result.nonfinite_increments``).

Masked proposal (``mask_proposal``, on by default): when the potential has ``allowed`` (a hard
constraint that knows which next tokens keep the sequence possible: `potentials.dfa_constraint`,
`regex_constraint`, `banned_tokens`, products of them), token s is drawn from

    q(v) ~ p(v | y_<s)^{1/tau} 1[v allowed]      (renormalised over the allowed tokens)

with the same weight formula (log q is the masked, renormalised one; a pure hard constraint at
tau = 1 gives log G = log sum_{v allowed} p(v)). A token is allowed when ``allowed`` says so for
``prefix`` or, if the sequence ends right after it (cut at T, or forced EOS next), for
``complete``; every EOS id when ``complete`` of the current body is finite. Masked-out tokens carry
zero target mass, so the target and Z are unchanged, while no particle is lost to the constraint;
a row with no allowed token gets weight -inf (never NaN). The same masked q is used by the
resample-move regeneration (its MH ratio uses the recorded log q).

Rejection-sampled proposal (AWRS): when the potential can only *evaluate* candidate tokens
(``accepts``: a grammar, a parser, any host predicate; `targets.lm.potentials.Potential`), token s
is drawn by adaptive weighted rejection sampling (`proposals.awrs`, docs/algorithms.md section 8):
tokens are drawn from q (masked first when the potential also has ``allowed``) without
replacement, ``accepts`` is evaluated on each until one passes, once more on the next one, and the
walk returns an estimate W of sum_v q(v) 1[v accepted] that is properly weighted with the drawn
token, E[W 1{x = v}] = q(v) 1[v accepted]. The weight formula is the masked one with the exact
normaliser replaced by W (``log q`` recorded = log q(x) - log W), so the SMC stays exact
(random-weight SMC), and only the drawn tokens are evaluated: one evaluation per rejected token,
plus two. An EOS candidate passes when ``complete`` of the body is finite. Not combined with
``rejuvenate`` (its MH ratio needs the proposal's exact density).

Lookahead (``lookahead = K > 0``): the twist of an unfinished prefix is estimated by K rollouts
from p to the end (EOS or T tokens): ``psi_hat(y_1:s) = mean_k phi(y_1:s, Y^k)``, unbiased for
``psi(y_1:s) = E_p[phi(Y) | y_1:s]``, so that the intermediate targets are the marginals of Pi.
The estimate is kept with the particle and divided out at the next step (random-weight SMC: the
rollouts are auxiliary variables of an extended target whose marginal is p(y_1:s) psi(y_1:s), so
Z_hat stays unbiased and the final weights exact); ``psi_0 = 1``. That argument needs the twist
to be positive wherever psi is: K rollouts that all fail (phi = 0) on a live prefix would zero
its weight for good and bias Z_hat low (measured: Z_hat / Z = 0.94 for a banned token, T = 4,
K = 4). The twist is therefore the defensive mixture ``(1 - eps) psi_hat + eps psi_prefix``
(eps = `LOOKAHEAD_FLOOR`, psi_prefix = exp(prefix), positive wherever a completion can be allowed):
any positive twist keeps the SMC exact; this one is within eps psi_prefix of unbiased for psi.
With blocks the rollouts run only at the block's last token (the prefix twists telescope inside a
block). Not combined with ``rejuvenate``, and needs ``forced_eos=False`` (its rollouts end at EOS
or at T, as that target's sequences do).

Many prompts: B prompts [B, P] make a model of B groups (`smc.FeynmanKac.groups`), each prompt
weighted, resampled and moved on its own with its own key, one decode call for every row.

Block-wise: each Feynman-Kac step generates ``block_size`` = B tokens and multiplies their
increments, so weighting and (ESS-triggered) resampling happen only every B tokens; this is the
same as resampling only on block boundaries.

Resample-move: after each resampling before step t (so after L = t B tokens), every particle gets
one MH step invariant for gamma_L: cut i uniform in {0, ..., |y| - 1} (|y| includes the EOS), keep
y_1:i, regenerate from q until EOS or L tokens, accept with

    log r = log gamma(y') - log gamma(y) + log q(y_{i+1:} | y_1:i) - log q(y'_{i+1:} | y_1:i)
            + log |y| - log |y'|

(with q = p the model terms cancel, leaving the potential ratio and the index-choice correction).
Unfinished particles all have exactly L < T tokens at that point, so y' lies in the same space
(EOS-terminated within L tokens, or unfinished with L tokens).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

import smc
from proposals.awrs import NO_CANDIDATE, awrs
from proposals.tokens import NO_TOKEN, filtered_logprobs
from smc.validation import static_bool, static_int, static_positive
from targets.lm import decoding
from targets.lm.decoding import SequenceState
from targets.lm.potentials import (
    SKIP_LENGTH,
    Potential,
    check_accepts,
    check_allowed,
    check_potential,
)

Array = jax.Array
LOOKAHEAD_FLOOR = 1e-3   # eps of the lookahead twist's defensive mixture (module docstring)


class TwistedComponents(NamedTuple):
    """Reward-twisted SMC for one prompt or B prompts, and its parts (see `twisted_components`).

    With B prompts the rows are B consecutive groups (group b continues prompt b) and every
    ``key`` below is B keys, one per group."""

    model: smc.FeynmanKac   # with `move` when rejuvenation is on
    from_tokens: Any        # (tokens [N, T], length [N], limit) -> SequenceState (teacher forcing)
    move: Any               # (key, state, t) -> state: the MH step invariant for gamma_{tB}
    twist: Any              # (key, state) -> [N] log of the K-rollout estimate of psi for the
                            # rows' prefixes (None without lookahead)


def twisted_components(lm, params, prompt, potential: Potential, *, max_new_tokens: int,
                       block_size: int = 1, temperature: float = 1.0, rejuvenate: bool = False,
                       forced_eos: bool = True, lookahead: int = 0, prompt_length=None,
                       eos_ids: int | Sequence[int] | None = None, mask_proposal: bool = True,
                       distinct_rows: bool = False) -> TwistedComponents:
    """Build reward-twisted SMC; every argument is checked before generation.

    ``prompt``: one prompt [P] with ``prompt_length`` real tokens (default P), or B prompts
    [B, P] with ``prompt_length`` [B]: then a model of B groups (`smc.FeynmanKac.groups`), N
    particles per prompt, each prompt weighted, resampled and moved on its own with its own key
    (tokens, block keys, lookahead rollouts, MH cut, regeneration and accept), so that
    `smc.run` equals B runs of the one-prompt model with the same keys.
    ``temperature`` tau: the proposal p^{1/tau} (the weight corrects for it). ``rejuvenate``: one
    MH suffix-regeneration step per particle after each resampling. ``forced_eos`` (default
    True): only sequences that end with an EOS within T tokens (module docstring); False: also
    those cut at T. ``lookahead`` K > 0: the twist is estimated by K rollouts from p (module
    docstring; with ``forced_eos=False``). ``mask_proposal``: propose only
    allowed tokens when the potential has ``allowed`` (exact; no effect otherwise). ``eos_ids``:
    the tokens that end a sequence, any of them (default the model's; the first is the forced one;
    see `decoding.resolve_eos`). ``distinct_rows``: run the model on one row per distinct
    unfinished sequence (`targets.lm.distinct`; same results, less work when resampling or
    lookahead leaves copies).
    """
    T = static_int("max_new_tokens", max_new_tokens, 1)
    B = static_int("block_size", block_size, 1)
    tau = static_positive("temperature", temperature)
    K = static_int("lookahead", lookahead, 0)
    if K and rejuvenate:
        raise ValueError("lookahead is not combined with rejuvenate")
    if K and forced_eos:
        raise ValueError("lookahead needs forced_eos=False (its rollouts end at EOS or at the "
                         "token limit, the sequences of that target)")
    prompts, prompt_lengths, groups = decoding.check_prompt_or_prompts(lm, prompt, prompt_length,
                                                                       T)
    eos = decoding.resolve_eos(lm, eos_ids, forced_eos)
    check_potential(potential, T)
    masked = static_bool("mask_proposal", mask_proposal) and potential.allowed is not None
    distinct = static_bool("distinct_rows", distinct_rows)
    if masked:
        check_allowed(potential, T, lm.vocab_size)
    rejection = potential.accepts is not None
    if rejection:
        check_accepts(potential, T)
        if rejuvenate:
            raise ValueError("rejuvenate is not combined with a potential that has `accepts` "
                             "(AWRS gives only an estimate of the proposal's normaliser, and the "
                             "MH ratio needs its exact density)")
    prefix_fn = jax.vmap(potential.prefix)
    complete_fn = jax.vmap(potential.complete)
    num_blocks = -(-T // B)
    num_groups = 1 if groups is None else groups
    # the prompts run once, here; their caches are shared by every row, never resampled
    prefilled = decoding.prefill(lm, params, prompts, prompt_lengths)

    def start(rows: int) -> SequenceState:
        """rows // G rows per prompt (G prompts), prompt-major."""
        return decoding.start(lm, prefilled, max_new_tokens=T, eos_ids=eos,
                              copies=rows // num_groups)

    def proposal_and_allowed(s: SequenceState) -> tuple[Array, Array]:
        """(log q [N, V], some token allowed [N]) for each row's next token; q ~ p^{1/tau}
        (masked)."""
        if not masked:
            return filtered_logprobs(s.logprobs, tau), jnp.ones(s.length.shape, bool)
        # the sequence ends right after this token: cut at T, or a forced EOS at T - 1 follows
        final = (s.length + 1 >= T) | (forced_eos & (s.length + 2 >= T))
        vocab = s.logprobs.shape[-1]
        allow = jax.vmap(lambda tok, m, f: potential.allowed(tok, m, vocab, f))(
            s.tokens, s.body_length, final)
        if eos != (-1,):
            # each EOS id ends the body here: allowed when complete(body) is finite
            ends_ok = jnp.isfinite(complete_fn(s.tokens, s.body_length))
            allow = allow.at[:, np.asarray(eos)].set(ends_ok[:, None])
        some = jnp.any(allow, axis=-1)
        # no allowed token: sample unmasked (the caller kills the row), never a 0/0 = NaN
        allow = allow | ~some[:, None]
        return filtered_logprobs(s.logprobs, tau, mask=allow), some

    def proposal(s: SequenceState) -> Array:
        return proposal_and_allowed(s)[0]

    def rejection_draw(key, s: SequenceState, logq_all: Array) -> tuple[Array, Array, Array]:
        """(tokens [N], log q(x) - log W [N], a token was accepted [N]) by AWRS from log q
        [N, V]; ended rows (and a forced EOS) take no evaluation."""
        live = ~s.done
        if forced_eos:
            live = live & (s.length != T - 1)
        final = (s.length + 1 >= T) | (forced_eos & (s.length + 2 >= T))
        ends_ok = (jnp.isfinite(complete_fn(s.tokens, s.body_length)) if eos != (-1,)
                   else jnp.zeros(live.shape, bool))

        def draw(key, logq, tokens, body_length, final, ends_ok, live):
            def accept(candidates):
                end = decoding.is_eos(candidates, eos)
                asked = jnp.where(end | ~live, NO_CANDIDATE, candidates)
                ok = jax.vmap(potential.accepts)(tokens, body_length, asked, final)
                # a row that needs no evaluation accepts its first draw: one round, no call
                return jnp.where(live, jnp.where(end, ends_ok, ok), True)
            return awrs(key, logq, accept)

        drawn = decoding.per_group(draw, key, groups, logq_all, s.tokens, s.body_length, final,
                                   ends_ok, live)
        found = drawn.tokens != NO_TOKEN
        # a row with no accepted token ends on the fill token, its weight -inf (some = False):
        # its W = 0 makes log q - log W = +inf, never log q(fill) - log W, which is NaN when
        # the fill token is masked out (-inf - -inf); an undefined q (NaN W) stays NaN
        tokens = jnp.where(found, drawn.tokens, max(eos[0], 0)).astype(jnp.int32)
        logq = jnp.take_along_axis(logq_all, tokens[:, None], axis=-1)[:, 0]
        dead = ~found & ~jnp.isnan(drawn.log_weight)
        return tokens, jnp.where(dead, jnp.inf, logq - drawn.log_weight), found

    def complete_of_done(s: SequenceState) -> Array:
        """complete for the ended rows (SKIP_LENGTH for the others: a host potential, e.g. code
        execution, then does no work for rows whose value is discarded)."""
        return complete_fn(s.tokens, jnp.where(s.done, s.body_length, SKIP_LENGTH))

    def potential_of(s: SequenceState) -> Array:
        return jnp.where(s.done, complete_of_done(s),
                         prefix_fn(s.tokens, jnp.where(s.done, SKIP_LENGTH, s.body_length)))

    def twist(key, s: SequenceState) -> Array:
        """log twist per row: the K-rollout estimate of E_p[phi | prefix] mixed with
        eps exp(prefix) (positive wherever the prefix is)."""
        n = s.length.shape[0]
        copies = jax.tree_util.tree_map(lambda x: jnp.repeat(x, K, axis=0), s)
        ends = decoding.rollout(key, lm, params, prefilled, copies, lambda c: c.logprobs, eos,
                                groups=groups, distinct_rows=distinct)
        log_phi = complete_fn(ends.tokens, ends.body_length).reshape(n, K)
        log_psi_hat = logsumexp(log_phi, axis=1) - jnp.log(K)
        return jnp.logaddexp(jnp.log1p(-LOOKAHEAD_FLOOR) + log_psi_hat,
                             jnp.log(LOOKAHEAD_FLOOR) + prefix_fn(s.tokens, s.body_length))

    def init(key, n):
        del key
        s = start(num_groups * n)
        log_psi = (jnp.zeros(s.length.shape, jnp.float32) if K
                   else prefix_fn(s.tokens, s.body_length))
        return s._replace(log_potential=log_psi), log_psi

    def token_step(key, s: SequenceState, block_end: bool = True):
        key_token, key_twist = decoding.split_key(key, 2, groups)
        live = ~s.done
        logq_all, some = proposal_and_allowed(s)
        if rejection:
            tokens, logq, accepted = rejection_draw(key_token, s, logq_all)
            some = some & accepted
            if forced_eos:
                tokens, logq, _ = decoding.force_eos(s, tokens, logq, eos)
        else:
            tokens, logq, _ = decoding.draw_token(key_token, s, logq_all, eos, forced_eos,
                                                  groups=groups)
        lp_token = decoding.token_logprob(s, tokens)
        new = decoding.append(lm, params, prefilled, s, tokens, logq, eos,
                              distinct_rows=distinct)
        old = s.log_potential
        if K:
            estimate = twist(key_twist, new) if block_end else old
            log_pot = jnp.where(new.done, complete_of_done(new), estimate)
        else:
            log_pot = potential_of(new)
        log_pot = jnp.where(some, log_pot, -jnp.inf)
        # a row already at -inf stays there with zero increments (never -inf - -inf = NaN),
        # unless the potential turns NaN or +inf: that stays visible as a NaN increment
        pot_increment = jnp.where(jnp.isneginf(old),
                                  jnp.where(jnp.isnan(log_pot) | jnp.isposinf(log_pot),
                                            jnp.nan, 0.0),
                                  log_pot - old)
        increment = jnp.where(live, lp_token - logq + pot_increment, 0.0)
        return new._replace(log_potential=jnp.where(live, log_pot, old)), increment

    def step(key, s: SequenceState, t):
        def body(carry, key):
            s, total = carry
            s, increment = token_step(key, s, block_end=not K)
            return (s, total + increment), None
        n = s.length.shape[0]
        key_first, key_last = decoding.split_key(key, 2, groups)
        inner = B - 1 if K else B   # with lookahead the block's last token runs the rollouts
        (s, total), _ = jax.lax.scan(body, (s, jnp.zeros((n,), jnp.float32)),
                                     decoding.split_key(key_first, inner, groups))
        if K:
            s, increment = token_step(key_last, s, block_end=True)
            total = total + increment
        return s, total

    def regenerate(key, tokens, cut, limit) -> SequenceState:
        """Teacher-force tokens[:, :cut], then sample from q until EOS or ``limit`` tokens."""
        s = decoding.rollout(key, lm, params, prefilled, start(tokens.shape[0]), proposal, eos,
                             limit=limit, teacher=tokens, cut=cut, groups=groups,
                             distinct_rows=distinct)
        return s._replace(log_potential=potential_of(s))

    def from_tokens(tokens, length, limit) -> SequenceState:
        """Score given sequences (EOS-terminated within ``limit`` or unfinished with ``limit``;
        with B prompts, B consecutive groups of rows). Nothing is sampled: the key is unused."""
        tokens = jnp.asarray(tokens, jnp.int32)
        key = jax.random.PRNGKey(0)
        key = key if groups is None else jax.random.split(key, groups)
        return regenerate(key, tokens, jnp.asarray(length, jnp.int32), limit)

    def move(key, s: SequenceState, t) -> SequenceState:
        limit = jnp.minimum(t * B, T - 1)
        moved, _ = decoding.suffix_mh(
            key, s, lambda k, tokens, cut: regenerate(k, tokens, cut, limit),
            lambda c: c.logp + c.log_potential, groups=groups)
        return moved

    def done(s: SequenceState):
        return s.done

    model = smc.FeynmanKac(init=init, step=step, num_steps=num_blocks, done=done,
                           move=move if rejuvenate else None, groups=groups)
    return TwistedComponents(model=model, from_tokens=from_tokens, move=move,
                             twist=twist if K else None)


def twisted_model(lm, params, prompt, potential: Potential, **options) -> smc.FeynmanKac:
    """The Feynman-Kac model of reward-twisted SMC for one prompt [P], or B prompts [B, P] as a
    model of B groups (options: `twisted_components`)."""
    return twisted_components(lm, params, prompt, potential, **options).model


def twisted_smc(key, lm, params, prompt, potential: Potential, *, num_particles: int,
                resampling=smc.resampling.systematic, ess_threshold: float = 0.5,
                **options) -> smc.SMCResult:
    """Run reward-twisted SMC: an `smc.SMCResult` whose particles are the weighted sequences
    (`decoding.SequenceState` without the cache; `decoding.draw` picks one).

    One prompt [P], or B prompts [B, P] in one program (`twisted_components`; every field of the
    result then has a leading [B] axis, and ``key`` is one key or B keys, one per prompt).

    ``log_evidence`` estimates log sum_y p(y) phi(y) (Z_hat unbiased);
    ``nonfinite_increments`` counts NaN (or +inf) log-weight increments. ``options``: those of
    `twisted_components` (``max_new_tokens`` ...).
    Pure in ``key``: jit with the static arguments bound, vmap over keys or prompts.
    """
    model = twisted_model(lm, params, prompt, potential, **options)
    result = smc.run(key, model, num_particles, resampling=resampling, ess_threshold=ess_threshold)
    return result._replace(particles=decoding.without_cache(result.particles))
