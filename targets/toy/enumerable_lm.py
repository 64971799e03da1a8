"""An enumerable language model: a random position-dependent Markov chain over a few tokens.

It implements `targets.lm.protocol.LanguageModel` (``init_cache``, ``prefill``, ``decode``,
``max_len``, ``eos_ids``, ``bos_id``, ``vocab_size``), so SMC code paths written for a real model
run on it unchanged, while every sequence probability is known exactly by enumeration.

Vocabulary: tokens ``0..K-1`` are ordinary, ``K..K+E-1`` are the E EOS tokens (``n_eos``, one by
default; each ends a sequence, as a chat model's ``<|im_end|>`` and ``<|endoftext|>`` both do),
``K+E`` is BOS (never generated). The prompt is normally ``[BOS]``. The j-th generated token
(j = 0, 1, ...) is drawn from ``softmax(table[min(j, L-1), previous token])`` where the previous
token of j = 0 is the last prompt token. A sequence ``y`` ends with its first EOS or is cut after
``L`` tokens; the enumerated support is every such ``y`` and ``p(y)`` is the product of its token
probabilities (no EOS factor for a cut sequence), so the probabilities sum to one.
"""
from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from smc.validation import static_int


@dataclasses.dataclass(frozen=True, eq=False)
class EnumerableLM:
    n_tokens: int = 3          # K ordinary tokens
    max_new: int = 4           # L
    prompt_len: int = 1        # prompts are [BOS] unless told otherwise
    n_eos: int = 1             # E EOS tokens (0: none; every sequence is then cut at L)

    def __post_init__(self):
        static_int("n_tokens", self.n_tokens, 1)
        static_int("max_new", self.max_new, 1)
        static_int("prompt_len", self.prompt_len, 1)
        static_int("n_eos", self.n_eos, 0)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(range(self.n_tokens, self.n_tokens + self.n_eos))

    @property
    def bos_id(self) -> int:
        return self.n_tokens + self.n_eos

    @property
    def vocab_size(self) -> int:
        return self.n_tokens + self.n_eos + 1

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.max_new

    def init_params(self, key, scale: float = 1.5, eos_bias: float = -1.0):
        V = self.vocab_size
        logits = scale * jax.random.normal(key, (self.max_new, V, V))
        logits = logits.at[:, :, np.asarray(self.eos_ids, np.int32)].add(eos_bias)
        logits = logits.at[:, :, self.bos_id].set(-jnp.inf)
        return {"table": jax.nn.log_softmax(logits, axis=-1)}

    # --------------------------------------------------------------- interface
    def init_cache(self, batch: int, length: int):
        del length  # the chain needs only the previous token
        return {"prev": jnp.full((batch,), self.bos_id, jnp.int32)}

    def _dist(self, params, j, prev):
        j = jnp.clip(j, 0, self.max_new - 1)
        return params["table"][j, prev]

    def prefill(self, params, tokens, lengths):
        prev = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0].astype(jnp.int32)
        prompt_cache = {"length": lengths.astype(jnp.int32)}
        return prompt_cache, self._dist(params, jnp.zeros_like(prev), prev)

    def decode(self, params, prompt_cache, cache, tokens, positions):
        n = tokens.shape[0]
        start = jnp.repeat(prompt_cache["length"], n // prompt_cache["length"].shape[0],
                           total_repeat_length=n)
        write = positions < self.max_len
        prev = jnp.where(write, tokens.astype(jnp.int32), cache["prev"])
        j = positions + 1 - start  # index of the token this distribution is for
        return {"prev": prev}, self._dist(params, j, prev)

    # --------------------------------------------------------------- exact answers
    def sequences(self) -> list[tuple[int, ...]]:
        """Every complete sequence: ends with its only EOS (any of them), or has L tokens and
        no EOS."""
        K, out = self.n_tokens, []
        for n in range(self.max_new):
            for body in itertools.product(range(K), repeat=n):
                out.extend(body + (eos,) for eos in self.eos_ids)
        out.extend(itertools.product(range(K), repeat=self.max_new))
        return out

    def sequence_logprob(self, params, seq, prev: int | None = None) -> float:
        table = np.asarray(params["table"], np.float64)
        with np.errstate(invalid="ignore"):  # renormalise in float64 (-inf entries stay -inf)
            table = table - np.logaddexp.reduce(table, axis=-1, keepdims=True)
        prev = self.bos_id if prev is None else prev
        total = 0.0
        for j, t in enumerate(seq):
            total += table[min(j, self.max_new - 1), prev, t]
            prev = t
        return total

    def enumerate(self, params):
        """``(sequences, logp)`` over the whole support (``logp`` sums to one in probability)."""
        seqs = self.sequences()
        return seqs, np.array([self.sequence_logprob(params, s) for s in seqs])

    def power_distribution(self, params, alpha: float):
        """Exact normalised ``p(y)^alpha`` over the support (Power-SMC's target)."""
        seqs, lp = self.enumerate(params)
        a = alpha * lp
        return seqs, np.exp(a - np.logaddexp.reduce(a))
