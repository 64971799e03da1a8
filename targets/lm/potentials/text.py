"""Rewards of the decoded text, computed on the HOST (docs/algorithms.md section 6).

Any Python function of the text runs through ``jax.pure_callback`` (one call per SMC step for all
particles, results cached per token sequence), so it works under ``jit`` and ``vmap`` but not on
an accelerator without host round trips. A vocabulary is given as ``token_bytes``: the UTF-8
bytes of every token id (`targets.lm.tokenizer.token_bytes_of`, or any list of strings for a toy
model); the text of ``tokens[:length]`` is the concatenation of their bytes, decoded with
replacement of invalid UTF-8 (what the tokenizer's ``decode`` gives).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from smc.optional import require
from smc.validation import static_bool, static_finite
from targets.lm.potentials.base import SKIP_LENGTH, Potential
from targets.lm.tokenizer import as_token_bytes


def text_decoder(token_bytes: Sequence[bytes | str]) -> Callable[[Sequence[int]], str]:
    """``decode(ids) -> str``: concatenated token bytes, invalid UTF-8 replaced by U+FFFD."""
    table = as_token_bytes(token_bytes)
    return lambda ids: b"".join(table[int(i)] for i in ids).decode("utf-8", "replace")


def text_reward(score: Callable[[str], float], token_bytes: Sequence[bytes | str],
                lam: float = 1.0, prefix: bool = True, cache_size: int = 1 << 16) -> Potential:
    """Reward of the decoded text, computed on the HOST: ``lam * score(text)``.

    complete = lam * score(text of y); prefix = lam * score(text of the prefix) when ``prefix``,
    else 0 (a terminal reward). ``score`` runs in Python through ``jax.pure_callback`` (one call
    per batch of sequences; results cached per token sequence); a NaN score is passed on to the
    SMC engine, which counts it (``nonfinite_increments``).
    """
    lam = static_finite("lambda", lam)
    prefix = static_bool("prefix", prefix)
    decode = text_decoder(token_bytes)

    @functools.lru_cache(maxsize=cache_size)
    def cached(ids: tuple) -> float:
        return float(score(decode(ids)))

    def host(tokens, length):
        tokens, length = np.asarray(tokens), np.asarray(length)
        flat_tok = tokens.reshape(-1, tokens.shape[-1])
        flat_len = np.broadcast_to(length, tokens.shape[:-1]).reshape(-1)
        out = np.array([cached(tuple(int(x) for x in t[:n])) if n != SKIP_LENGTH else 0.0
                        for t, n in zip(flat_tok, flat_len)], np.float32)
        return (lam * out).reshape(tokens.shape[:-1]).astype(np.float32)

    def log_phi(tokens, length):
        return jax.pure_callback(host, jax.ShapeDtypeStruct((), jnp.float32), tokens,
                                 jnp.asarray(length, jnp.int32), vmap_method="broadcast_all")

    return Potential(prefix=log_phi if prefix else (lambda tok, n: jnp.zeros((), jnp.float32)),
                     complete=log_phi)


@functools.lru_cache(maxsize=1)
def _vader():
    vader = require("vaderSentiment.vaderSentiment", "lm", "the VADER sentiment reward")
    return vader.SentimentIntensityAnalyzer()   # ships its lexicon


def vader_compound(text: str) -> float:
    """VADER's compound sentiment of ``text``, in [-1, 1]."""
    return _vader().polarity_scores(text)["compound"]


def vader_sentiment(token_bytes: Sequence[bytes | str], lam: float = 1.0,
                    prefix: bool = True) -> Potential:
    """Sentiment steering: ``lam * VADER compound(text)`` (host code, see `text_reward`)."""
    return text_reward(vader_compound, token_bytes, lam, prefix)
