"""Adaptive weighted rejection sampling (AWRS) of one token per row (docs/algorithms.md section 8).

Lipkin et al. 2025, "Fast Controlled Generation from Language Models with Adaptive Weighted
Rejection Sampling". The target of a row is q(v) c(v) / Z with Z = sum_v q(v) c(v), where
q = softmax(logq) is the row's proposal and c a 0/1 constraint that can only be *evaluated* one
token at a time (a grammar, a parser, a schema checked on the decoded text): no mask over the
vocabulary is available. AWRS walks the tokens in the order of sampling without replacement from
q (each next token drawn from q restricted to the tokens not yet seen), evaluating c on each, and
stops at the first token x with c(x) = 1. That x is an exact draw from q c / Z. With R the mass
of the tokens rejected before x, it then evaluates c once more, on the next token y in the same
order (if any token with mass is left), and returns the weight

    W = 1 - R              if y is accepted, or no token with mass is left after x,
    W = q(x)               if y is rejected.

(Written as the paper's running product: each rejection multiplies M by 1 - q_i / (1 - R_i),
which telescopes to M = 1 - R, and a rejected y multiplies it by x's conditional probability
q(x) / (1 - R).) W is unbiased for Z, and more: E[W 1{x = v}] = q(v) c(v) for every v, so
(x, W) is properly weighted for the unnormalised target q c, and a sequential Monte Carlo step
may use W in place of the exact Z of a masked proposal (random-weight SMC stays exact). It costs
one evaluation per rejected token, plus two: one for x, one for y.

Masses are computed anew at every evaluation as the log-sum-exp of the tokens not yet rejected
(`proposals.tokens.draw_tokens` gives it with each draw), never as 1 - (sum of rejected), which
would cancel catastrophically when most of the mass is rejected.

The constraint is a traced function ``accept(candidates [B] int32) -> bool [B]``: one call per
round for the whole batch, so a host predicate runs once per round through
``jax.pure_callback``. A candidate of -1 (`NO_CANDIDATE`) marks a row that needs no evaluation
this round; its answer is ignored, and a host predicate should skip it (and not count it).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from proposals.tokens import NO_TOKEN, draw_tokens
from smc.validation import static_int

Array = jax.Array
NO_CANDIDATE = -1

SEARCHING, VERIFYING, FINISHED = 0, 1, 2


class AWRSDraw(NamedTuple):
    """One AWRS draw per row."""

    tokens: Array      # [B] int32 the accepted token; NO_TOKEN where c accepts no token with mass
    log_weight: Array  # [B] log W: unbiased for log-free Z = sum_v exp(logq_v) c(v) (see module);
                       # -inf where nothing is accepted; NaN where `max_checks` was reached first
    checks: Array      # [B] int32 evaluations of c made for the row


class _Walk(NamedTuple):
    key: Array
    rejected: Array    # [B, V] bool
    phase: Array       # [B] int32: SEARCHING, VERIFYING or FINISHED
    token: Array       # [B] int32
    log_weight: Array  # [B]
    checks: Array      # [B] int32


def awrs(key: Array, logq: Array, accept: Callable[[Array], Array],
         max_checks: int | None = None) -> AWRSDraw:
    """AWRS for every row of ``logq [B, V]`` (log-probabilities, or any unnormalised logits: W
    then estimates sum_v exp(logq_v) c(v)); ``accept`` as in the module docstring.

    ``max_checks``: at most this many evaluations per row (>= 2; None: as many as needed, up to
    V + 1). A row that reaches it before finishing gets ``log_weight`` NaN (an estimate cut short
    is not unbiased; the SMC engine counts NaN increments) and its accepted token, if it has one,
    else NO_TOKEN.
    """
    logq = jnp.asarray(logq)
    if logq.ndim != 2:
        raise ValueError(f"logq must be [B, V], got shape {logq.shape}")
    rows, vocab_size = logq.shape
    limit = vocab_size + 1 if max_checks is None else static_int("max_checks", max_checks, 2)
    columns = jnp.arange(vocab_size, dtype=jnp.int32)

    def unfinished(w: _Walk) -> Array:
        return jnp.any(w.phase != FINISHED)

    def one_round(w: _Walk) -> _Walk:
        key, key_draw = jax.random.split(w.key)
        # while verifying, x itself is excluded: the next token in the order comes after it
        excluded = w.rejected | ((w.phase == VERIFYING)[:, None] & (columns == w.token[:, None]))
        draw = draw_tokens(key_draw, logq, 1.0, ~excluded)
        found = draw.tokens != NO_TOKEN
        evaluate = (w.phase != FINISHED) & found & (w.checks < limit)
        ok = jnp.asarray(accept(jnp.where(evaluate, draw.tokens, NO_CANDIDATE)), bool)
        accepted, refused = evaluate & ok, evaluate & ~ok
        searching, verifying = w.phase == SEARCHING, w.phase == VERIFYING
        cut_short = (w.phase != FINISHED) & found & (w.checks >= limit)

        # searching: nothing left -> finished with nothing; accepted -> x found, W = 1 - R so far
        # verifying: nothing left or y accepted -> W stays 1 - R; y refused -> W = q(x)
        log_q_token = jnp.take_along_axis(logq, jnp.maximum(w.token, 0)[:, None], axis=1)[:, 0]
        token = jnp.where(searching & accepted, draw.tokens,
                          jnp.where(searching & ~found, NO_TOKEN, w.token))
        log_weight = jnp.where(searching & accepted, draw.log_normalizer,
                               jnp.where(searching & ~found, -jnp.inf,
                                         jnp.where(verifying & refused, log_q_token,
                                                   w.log_weight)))
        log_weight = jnp.where(cut_short, jnp.nan, log_weight)
        phase = jnp.where(searching & accepted, VERIFYING, w.phase)
        phase = jnp.where((searching & ~found) | (verifying & (~found | evaluate)) | cut_short,
                          FINISHED, phase)
        rejected = w.rejected | ((searching & refused)[:, None]
                                 & (columns == draw.tokens[:, None]))
        return _Walk(key, rejected, phase.astype(jnp.int32), token.astype(jnp.int32), log_weight,
                     w.checks + evaluate.astype(jnp.int32))

    start = _Walk(key, jnp.zeros((rows, vocab_size), bool), jnp.zeros((rows,), jnp.int32),
                  jnp.full((rows,), NO_TOKEN, jnp.int32),
                  jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.int32))
    end = jax.lax.while_loop(unfinished, one_round, start)
    # a NaN or +inf logit leaves q undefined (the draw finds no token): NaN, not a dead -inf row
    undefined = jnp.any(jnp.isnan(logq) | jnp.isposinf(logq), axis=-1)
    return AWRSDraw(end.token, jnp.where(undefined, jnp.nan, end.log_weight), end.checks)
