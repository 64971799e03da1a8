"""The MH power sampler of Karan and Du (2025): the baseline Power-SMC is compared against.

Target: the power distribution p(y | x)^alpha over the support S_T of `targets.lm.power` (sequences
ending with EOS within T tokens, or cut at T tokens with p(y) their prefix probability).

Algorithm (``num_chains`` independent chains, vectorised): the sequence grows in blocks of
``block_size`` tokens. Stage k has the length limit L_k = min(k B, T) and the intermediate target
p(y)^alpha over S_{L_k}. A stage first extends every unfinished sequence to L_k tokens (or its EOS)
with the proposal q(v | prefix) = p(v | prefix)^alpha / C (temperature 1/alpha), then runs
``mh_steps`` Metropolis-Hastings steps, each:

    pick a cut i uniformly in {0, ..., |y| - 1};  keep y_1:i;  regenerate y'_{i+1:} from q until EOS
    or L_k tokens;  accept with probability min(1, r),
    log r = alpha (log p(y'_{i+1:} | y_1:i) - log p(y_{i+1:} | y_1:i))
            + log q(y_{i+1:} | y_1:i) - log q(y'_{i+1:} | y_1:i) + log |y| - log |y'|

The last term is the index-choice correction: the forward move picks the cut with probability
1/|y|, the reverse move (from y', the same cut) with 1/|y'|, and the lengths differ whenever the
regenerated suffixes do. Both suffixes are in S_{L_k}, so each step leaves p^alpha on S_{L_k}
invariant; the final stage (L = T) therefore targets p^alpha exactly, and the chains converge to it
as the number of steps grows (intermediate stages only provide a good start).

Cost: every regeneration is a pass of L_k decode steps that teacher-forces the kept prefix
(from the prompt's cache) and samples the rest; a cache-reusing implementation would skip the
forced part, so latency measured with this code over-states the MH sampler's cost by at most
that prefix (report it as such).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from targets.lm.power import _static_int, _static_real, check_prompt

Array = jax.Array


class MHState(NamedTuple):
    """Chains (leading axis C): a sequence each, with per-token log p and log q."""

    tokens: Array      # [C, T] EOS-padded
    length: Array      # [C] int32, EOS included
    eos: Array         # [C] bool, ended with EOS
    tok_logp: Array    # [C, T] log p(y_j | y_<j), 0 past the length
    tok_logq: Array    # [C, T] log q(y_j | y_<j), 0 past the length

    @property
    def logp(self) -> Array:
        return self.tok_logp.sum(-1)


class MHResult(NamedTuple):
    state: MHState
    acceptance: Array  # [num_blocks] mean acceptance rate of the MH steps of each stage


class MHPowerSampler(NamedTuple):
    """Functions of one prompt (see `mh_power_sampler`)."""

    from_tokens: callable   # (tokens [C, T], length [C], limit) -> MHState (scores the tokens)
    extend: callable        # (key, state, limit) -> state: grow unfinished rows to `limit`
    moves: callable         # (key, state, limit, num_steps) -> (state, acceptance rate)
    run: callable           # (key, num_chains) -> MHResult: the whole block-wise sampler


def mh_power_sampler(lm, params, prompt, *, alpha: float, max_new_tokens: int, block_size: int,
                     mh_steps: int, prompt_length=None, eos_id: int | None = None
                     ) -> MHPowerSampler:
    """Build the MH power sampler for one prompt; checks every argument before generating."""
    alpha = _static_real("alpha", alpha)
    T = _static_int("max_new_tokens", max_new_tokens, 1)
    B = _static_int("block_size", block_size, 1)
    K = _static_int("mh_steps", mh_steps, 0)
    prompt, prompt_length = check_prompt(lm, prompt, prompt_length, T)
    eos = lm.eos_id if eos_id is None else eos_id
    if eos is None:
        raise ValueError("the model has no eos_id; pass eos_id")
    max_len = lm.max_len
    cache1, logprobs1 = lm.prefill(params, prompt[None, :], prompt_length[None])

    def regenerate(key, tokens, keep, limit: int):
        """Teacher-force tokens[:, :keep], then sample from q until EOS or `limit` tokens."""
        C = tokens.shape[0]
        cache, logprobs = jax.tree_util.tree_map(
            lambda x: jnp.broadcast_to(x, (C,) + x.shape[1:]), (cache1, logprobs1))
        carry = (cache, logprobs.astype(jnp.float32), jnp.zeros((C,), bool),
                 jnp.zeros((C,), bool), jnp.zeros((C,), jnp.int32))

        def body(carry, inputs):
            cache, logprobs, done, ended_eos, length = carry
            key, j = inputs
            logq_all = jax.nn.log_softmax(alpha * logprobs, axis=-1)
            sampled = jax.random.categorical(key, logq_all, axis=-1).astype(jnp.int32)
            live = ~done
            tok = jnp.where(j < keep, tokens[:, j], sampled)
            tok = jnp.where(live, tok, eos)
            lp = jnp.where(live, jnp.take_along_axis(logprobs, tok[:, None], -1)[:, 0], 0.0)
            lq = jnp.where(live, jnp.take_along_axis(logq_all, tok[:, None], -1)[:, 0], 0.0)
            ends = (tok == eos) | (j + 1 >= limit)
            position = jnp.where(live, prompt_length + j, max_len)
            cache, next_logprobs = lm.decode(params, cache, tok, position)
            carry = (cache, next_logprobs.astype(jnp.float32), done | (live & ends),
                     ended_eos | (live & (tok == eos)), length + live.astype(jnp.int32))
            return carry, (tok, lp, lq)

        keys = jax.random.split(key, limit)
        (_, _, _, ended_eos, length), (tok, lp, lq) = jax.lax.scan(
            body, carry, (keys, jnp.arange(limit, dtype=jnp.int32)))
        pad = ((0, 0), (0, T - limit))
        return MHState(tokens=jnp.pad(tok.T, pad, constant_values=eos), length=length,
                       eos=ended_eos, tok_logp=jnp.pad(lp.T, pad), tok_logq=jnp.pad(lq.T, pad))

    def from_tokens(tokens, length, limit: int = T):
        """Score given sequences of S_limit (teacher forcing; nothing is sampled)."""
        return regenerate(jax.random.PRNGKey(0), jnp.asarray(tokens, jnp.int32), length, limit)

    def extend(key, state: MHState, limit: int):
        return regenerate(key, state.tokens, state.length, limit)

    def one_move(key, state: MHState, limit: int):
        key_cut, key_gen, key_accept = jax.random.split(key, 3)
        u = jax.random.uniform(key_cut, state.length.shape)
        cut = jnp.minimum((u * state.length).astype(jnp.int32), state.length - 1)
        proposal = regenerate(key_gen, state.tokens, cut, limit)
        suffix = jnp.arange(T)[None, :] >= cut[:, None]
        def total(x):
            return jnp.sum(jnp.where(suffix, x, 0.0), axis=-1)
        log_r = (alpha * (total(proposal.tok_logp) - total(state.tok_logp))
                 + total(state.tok_logq) - total(proposal.tok_logq)
                 + jnp.log(state.length.astype(jnp.float32))
                 - jnp.log(proposal.length.astype(jnp.float32)))
        accept = jnp.log(jax.random.uniform(key_accept, log_r.shape)) < log_r
        new = jax.tree_util.tree_map(
            lambda a, b: jnp.where(accept.reshape(accept.shape + (1,) * (a.ndim - 1)), a, b),
            proposal, state)
        return new, accept

    def moves(key, state: MHState, limit: int, num_steps: int):
        if num_steps == 0:
            return state, jnp.asarray(jnp.nan, jnp.float32)
        def body(state, key):
            state, accept = one_move(key, state, limit)
            return state, jnp.mean(accept.astype(jnp.float32))
        state, rates = jax.lax.scan(body, state, jax.random.split(key, num_steps))
        return state, rates.mean()

    def run(key, num_chains: int):
        C = _static_int("num_chains", num_chains, 1)
        state = MHState(tokens=jnp.full((C, T), eos, jnp.int32), length=jnp.zeros((C,), jnp.int32),
                        eos=jnp.zeros((C,), bool), tok_logp=jnp.zeros((C, T), jnp.float32),
                        tok_logq=jnp.zeros((C, T), jnp.float32))
        rates = []
        for k, limit in enumerate(range(B, T + B, B)):
            limit = min(limit, T)
            key, key_extend, key_moves = jax.random.split(key, 3)
            state = extend(key_extend, state, limit)
            state, rate = moves(key_moves, state, limit, K)
            rates.append(rate)
        return MHResult(state, jnp.stack(rates))

    return MHPowerSampler(from_tokens=from_tokens, extend=extend, moves=moves, run=run)


def mh_power(key, lm, params, prompt, *, alpha: float, num_chains: int, max_new_tokens: int,
             block_size: int, mh_steps: int, prompt_length=None,
             eos_id: int | None = None) -> MHResult:
    """Run the block-wise MH power sampler; ``num_chains`` independent samples (one per chain)."""
    sampler = mh_power_sampler(lm, params, prompt, alpha=alpha, max_new_tokens=max_new_tokens,
                               block_size=block_size, mh_steps=mh_steps,
                               prompt_length=prompt_length, eos_id=eos_id)
    return sampler.run(key, num_chains)
