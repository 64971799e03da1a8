"""The `LanguageModel` protocol: what every language-model algorithm may use of a model.

The algorithms (`targets.lm.generate`, `power`, `twisted`, `mh_power`) see a model only through
this protocol and the decoding layer built on it (`targets.lm.decoding`), so any model that has
these members runs under all of them: the transformer of `targets.lm.transformer` and the enumerable
toy of `targets.toy.enumerable_lm` today.

Every method is a pure function of its array arguments (it jits and vmaps); `params` is the
model's parameter pytree, kept apart from the model object, which holds only static
configuration. Shapes (B rows, P prompt positions, V = vocab_size, T = max_len):

- ``prefill(params, tokens [B, P] int32, lengths [B] int32) -> (prompt_cache, logprobs [B, V]
  float32)``: runs right-padded prompts (``1 <= lengths <= P``) and returns each prompt's cache
  (a pytree with leading axis B, stored once and shared by every row that continues the prompt)
  and the next-token log-probabilities after each row's last real token. Entries past a
  prompt's length are never attended to.
- ``init_cache(batch, length) -> cache``: an empty per-row cache for ``length`` generated
  tokens, a pytree whose every leaf has leading axis ``batch`` (so that resampling is
  ``jax.tree.map(lambda x: x[ancestors], cache)`` and copies none of the prompt).
- ``decode(params, prompt_cache, cache, tokens [N] int32, positions [N] int32) -> (cache,
  logprobs [N, V])``: feeds one token per row at its own position (prompt length + the number of
  tokens generated before it) and returns the distribution of the next one. N is a multiple of
  B and row r continues prompt ``r // (N / B)``. A position ``>= max_len`` writes nothing and
  its log-probabilities are to be ignored: that is how finished rows are frozen.
- ``vocab_size``: V. ``max_len``: the cache length T (prompt plus generated tokens).
- ``eos_ids``: a tuple of the token ids that end a sequence, every one of them (a model may have
  several, e.g. ``<|im_end|>`` and ``<|endoftext|>``); ``()`` when it has none. The first is the
  one written past a row's end and forced by ``forced_eos`` (`targets.lm.decoding.resolve_eos`).
- ``bos_id``: a token id, or None when the model has none.

Log-probabilities are normalised (``logsumexp = 0`` per row) and float32 whatever the
parameters' dtype.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

Array = jax.Array
Cache = Any
Params = Any


@runtime_checkable
class LanguageModel(Protocol):
    """A causal language model with a cache (see the module docstring for shapes)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_len(self) -> int: ...

    @property
    def eos_ids(self) -> tuple[int, ...]: ...

    @property
    def bos_id(self) -> int | None: ...

    def init_cache(self, batch: int, length: int) -> Cache: ...

    def prefill(self, params: Params, tokens: Array, lengths: Array) -> tuple[Cache, Array]: ...

    def decode(self, params: Params, prompt_cache: Cache, cache: Cache, tokens: Array,
               positions: Array) -> tuple[Cache, Array]: ...


def check_language_model(lm: Any) -> None:
    """TypeError naming what is missing unless `lm` has every member of `LanguageModel`."""
    if isinstance(lm, LanguageModel):
        return
    members = ("vocab_size", "max_len", "eos_ids", "bos_id", "init_cache", "prefill", "decode")
    missing = [name for name in members if not hasattr(lm, name)]
    raise TypeError(f"lm must implement targets.lm.protocol.LanguageModel; "
                    f"{type(lm).__name__} lacks {', '.join(missing)}")
