"""The `Potential` contract and its shape checks (docs/algorithms.md section 6)."""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
SKIP_LENGTH = -1   # `length` of a row whose potential value the SMC code discards


class Potential(NamedTuple):
    """A potential over generated token sequences (genlm-control's contract; docs/algorithms.md
    section 6). It scores a generated sequence in two ways,

        prefix(tokens, length)   -> log psi(y_1:length)   for an unfinished prefix,
        complete(tokens, length) -> log phi(y_1:length)   for a finished sequence,

    where ``tokens`` is one row ``[T]`` of generated token ids (int32, EOS-padded past the
    sequence; only ``tokens[:length]`` may matter) and ``length`` an int32 scalar: the number of
    tokens *before* the EOS (the EOS itself is never passed; a sequence cut at T has
    ``length = T``). Both return a float scalar (``-inf`` = forbidden). They are pure JAX and
    written for one sequence; the SMC code ``vmap``s them over particles. The log-weight of the
    next token x after the context ctx is ``prefix(ctx + x) - prefix(ctx)``, and at the end
    ``complete(y) - prefix(y_<last)``.

    A hard constraint may also say which next tokens keep the sequence possible (optional):

        allowed(tokens, length, vocab_size, final) -> bool [vocab_size]

    False for a token v (never the EOS, which the SMC code decides from ``complete``) only where
    appending v makes the potential -inf: ``prefix(ctx + v)``, or ``complete(ctx + v)`` when
    ``final`` (a traced bool: the sequence ends right after v). `targets.lm.twisted` then proposes
    from the masked, renormalised model (an exact masked proposal, docs/algorithms.md section 8);
    True where the potential is -inf anyway is still exact, only less efficient.

    A constraint that can only be *evaluated* token by token (a grammar, a parser, any host
    predicate) may give instead (optional):

        accepts(tokens, length, candidate, final) -> bool

    for one candidate next token (an int32 scalar, never an EOS): False exactly where appending it
    makes the potential -inf (``prefix``, or ``complete`` when ``final``). ``candidate`` -1 means
    "nothing to evaluate here": the answer is ignored, and a host predicate should skip it.
    `targets.lm.twisted` then draws tokens by adaptive weighted rejection sampling
    (`proposals.awrs`, docs/algorithms.md section 8), evaluating only the tokens it draws.

    The SMC code may ask for ``prefix`` or ``complete`` with ``length`` = `SKIP_LENGTH` (-1) for
    rows whose value it discards (a finished row's prefix, an unfinished row's complete): the
    result may be any float, and a host potential should skip the work (`text_reward` does).

    For the twisted SMC to be exact a prefix potential must be positive wherever some completion
    has a positive complete potential (``prefix = -inf`` only when every extension is forbidden);
    a hard constraint therefore gives ``-inf`` as soon as a prefix can no longer be completed
    into the language.
    """

    prefix: Callable[[Array, Array], Array]
    complete: Callable[[Array, Array], Array]
    allowed: Callable[[Array, Array, int, Array], Array] | None = None
    accepts: Callable[[Array, Array, Array, Array], Array] | None = None


def check_potential(potential: Potential, max_new_tokens: int) -> None:
    """Raise ValueError unless both functions map (int32 [T], int32 scalar) to a float scalar."""
    if not isinstance(potential, Potential):
        raise TypeError(f"potential must be a Potential, got {type(potential).__name__}")
    tokens = jax.ShapeDtypeStruct((max_new_tokens,), jnp.int32)
    length = jax.ShapeDtypeStruct((), jnp.int32)
    for name in ("prefix", "complete"):
        out = jax.eval_shape(getattr(potential, name), tokens, length)
        if not hasattr(out, "shape") or out.shape != ():
            raise ValueError(f"potential.{name} must return a scalar log-potential for one "
                             f"sequence, got {getattr(out, 'shape', type(out).__name__)}")
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise ValueError(f"potential.{name} must return a float, got {out.dtype}")


def check_accepts(potential: Potential, max_new_tokens: int) -> None:
    """Raise ValueError unless ``potential.accepts`` (if any) returns a bool scalar."""
    if potential.accepts is None:
        return
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    out = jax.eval_shape(potential.accepts, jax.ShapeDtypeStruct((max_new_tokens,), jnp.int32),
                         scalar, scalar, jax.ShapeDtypeStruct((), bool))
    if getattr(out, "shape", None) != () or out.dtype != jnp.bool_:
        raise ValueError(f"potential.accepts must return a bool scalar for one candidate, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} "
                         f"{getattr(out, 'shape', '')}")


def check_allowed(potential: Potential, max_new_tokens: int, vocab_size: int) -> None:
    """Raise ValueError unless ``potential.allowed`` (if any) returns a bool [vocab_size]."""
    if potential.allowed is None:
        return
    tokens = jax.ShapeDtypeStruct((max_new_tokens,), jnp.int32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    final = jax.ShapeDtypeStruct((), bool)
    out = jax.eval_shape(lambda t, n, f: potential.allowed(t, n, vocab_size, f), tokens, scalar,
                         final)
    if getattr(out, "shape", None) != (vocab_size,) or out.dtype != jnp.bool_:
        raise ValueError(f"potential.allowed must return a bool [{vocab_size}] mask, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} "
                         f"{getattr(out, 'shape', '')}")
