"""Hard constraints evaluated on the HOST one candidate token at a time (docs/algorithms.md
section 8): `host_constraint` from any verdict on token ids, `predicate_constraint` from Python
predicates on the decoded text, and the built-in `python_constraint`.

For languages no finite automaton describes (a grammar, "this parses", "this validates"), the
constraint is two functions of the text: ``prefix_ok(text)``, True when some continuation of
the text can still be complete (it may say True too often: that only costs particles later, it
never biases the result; saying False for a completable prefix does bias it), and
``complete_ok(text)``, True when the text is a finished member of the language. The potential is
0 where they hold and -inf elsewhere, and its ``accepts`` lets twisted SMC draw tokens by
adaptive weighted rejection sampling (`proposals.awrs`), evaluating only the tokens it draws.

Every answer is cached per token sequence (the same prefix is asked for by the rejection walk,
then by the potential of the row that took the token). A prefix whose bytes end inside a UTF-8
character is judged on the text before that character (the character is not finished yet); a
finished sequence's invalid bytes are replaced by U+FFFD. ``evaluations``, a `collections.Counter`
if given, counts ``checks`` (answers asked for) and ``calls`` (predicate calls, cache misses).
A predicate that raises stops the run with an error naming the constraint and the text.
"""
from __future__ import annotations

import ast
import collections
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from targets.lm.potentials.base import SKIP_LENGTH, Potential
from targets.lm.tokenizer import as_token_bytes


def prefix_text(data: bytes) -> str:
    """The text of a prefix's bytes, without a last character whose bytes are not all there."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.reason == "unexpected end of data":
            return data[:error.start].decode("utf-8", "replace")
        return data.decode("utf-8", "replace")


def predicate_constraint(prefix_ok: Callable[[str], bool], complete_ok: Callable[[str], bool],
                         token_bytes: Sequence[bytes | str], *, name: str = "predicate",
                         evaluations: collections.Counter | None = None,
                         cache_size: int = 1 << 16) -> Potential:
    """Hard constraint from host predicates on the text (module docstring): prefix = 0 iff
    ``prefix_ok``, complete = 0 iff ``complete_ok``, and ``accepts`` for a candidate token."""
    if not callable(prefix_ok) or not callable(complete_ok):
        raise TypeError(f"constraint {name!r}: prefix_ok and complete_ok must be callables of a "
                        f"str")
    table = as_token_bytes(token_bytes)

    def verdict(ids: tuple, final: bool) -> bool:
        data = b"".join(table[i] for i in ids)
        text = data.decode("utf-8", "replace") if final else prefix_text(data)
        try:
            return bool((complete_ok if final else prefix_ok)(text))
        except Exception as error:
            kind = "complete_ok" if final else "prefix_ok"
            raise RuntimeError(f"constraint {name!r}: {kind} raised on the text {text!r}: "
                               f"{error!r}") from error

    return host_constraint(verdict, evaluations=evaluations, cache_size=cache_size)


def host_constraint(verdict: Callable[[tuple, bool], bool], *,
                    evaluations: collections.Counter | None = None,
                    cache_size: int = 1 << 16) -> Potential:
    """The `Potential` of a host ``verdict(ids, final) -> bool`` on token-id tuples: True when
    the sequence ``ids`` can still be completed (``final`` False) or is complete (True).

    prefix / complete = 0 where the verdict holds, else -inf; ``accepts(tokens, length, v,
    final)`` = verdict(tokens[:length] + (v,), final). Verdicts are cached per (ids, final) and
    counted in ``evaluations`` (``checks`` asked, ``calls`` computed). All three run through
    ``jax.pure_callback``, one host call per batch of rows.
    """
    counts = collections.Counter() if evaluations is None else evaluations

    @functools.lru_cache(maxsize=cache_size)
    def cached(ids: tuple, final: bool) -> bool:
        counts["calls"] += 1
        return bool(verdict(ids, final))

    def ask(ids: tuple, final: bool) -> bool:
        counts["checks"] += 1
        return cached(ids, final)

    def rows(tokens, length, *more):
        tokens = np.asarray(tokens)
        batch = tokens.shape[:-1]
        flat = [np.broadcast_to(np.asarray(a), batch).reshape(-1) for a in (length, *more)]
        return tokens.reshape(-1, tokens.shape[-1]), flat, batch

    def host_potential(tokens, length, final):
        tokens, (length, final), batch = rows(tokens, length, final)
        out = [0.0 if n == SKIP_LENGTH or ask(tuple(int(x) for x in t[:n]), bool(f)) else -np.inf
               for t, n, f in zip(tokens, length, final)]
        return np.asarray(out, np.float32).reshape(batch)

    def host_accepts(tokens, length, candidate, final):
        tokens, (length, candidate, final), batch = rows(tokens, length, candidate, final)
        out = [c >= 0 and ask(tuple(int(x) for x in t[:n]) + (int(c),), bool(f))
               for t, n, c, f in zip(tokens, length, candidate, final)]
        return np.asarray(out, bool).reshape(batch)

    def potential(final: bool):
        def log_potential(tokens, length):
            return jax.pure_callback(host_potential, jax.ShapeDtypeStruct((), jnp.float32),
                                     tokens, jnp.asarray(length, jnp.int32),
                                     jnp.asarray(final), vmap_method="broadcast_all")
        return log_potential

    def accepts(tokens, length, candidate, final):
        return jax.pure_callback(host_accepts, jax.ShapeDtypeStruct((), jnp.bool_), tokens,
                                 jnp.asarray(length, jnp.int32), jnp.asarray(candidate, jnp.int32),
                                 jnp.asarray(final, bool), vmap_method="broadcast_all")

    return Potential(prefix=potential(False), complete=potential(True), accepts=accepts)


# Messages of a SyntaxError that appending text can cure (the input stopped inside a string or
# bracket, or before a block): never a reason to refuse a prefix.
UNFINISHED = ("unterminated string literal", "unterminated triple-quoted string",
              "was never closed", "unexpected EOF", "expected an indented block",
              "incomplete input", "unterminated f-string")


def python_prefix_ok(text: str) -> bool:
    """False only when no continuation of ``text`` can be Python: it has a syntax error that ends
    before its last line and is not one of the `UNFINISHED` kinds (an error on the last line
    may go away as the last token grows: ``5e`` -> ``5e3``, ``2 i`` -> ``2 if c else 3``)."""
    try:
        compile(text, "<prefix>", "exec", flags=ast.PyCF_ONLY_AST, dont_inherit=True)
        return True
    except SyntaxError as error:
        if any(kind in (error.msg or "") for kind in UNFINISHED):
            return True
        end = error.end_lineno or error.lineno or 0
        return end >= text.count("\n") + 1 - (1 if text.endswith("\n") else 0)
    except ValueError:   # null bytes: no continuation removes them
        return False


def python_complete_ok(text: str) -> bool:
    """``text`` parses as a Python module (`ast.parse`)."""
    try:
        ast.parse(text)
        return True
    except (SyntaxError, ValueError):
        return False


def python_constraint(token_bytes: Sequence[bytes | str], **options) -> Potential:
    """The text parses as Python (`python_complete_ok`); prefixes by `python_prefix_ok`, which
    refuses only what no continuation can fix."""
    return predicate_constraint(python_prefix_ok, python_complete_ok, token_bytes,
                                **{"name": "Python syntax", **options})
