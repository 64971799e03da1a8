"""Potentials for reward-twisted SMC over token sequences (docs/algorithms.md sections 6 and 8).

The contract follows genlm-control's (`Potential`, in full in ``base.py``): a potential scores
one generated row ``tokens [T]`` of int32 ids with ``length`` tokens before the EOS, as
``prefix(tokens, length) -> log psi`` for an unfinished prefix and
``complete(tokens, length) -> log phi`` for a finished sequence (float scalars, ``-inf`` =
forbidden, pure JAX, written for one sequence and ``vmap``ped by the SMC code); a hard constraint
may add ``allowed(tokens, length, vocab_size, final) -> bool [vocab_size]``, the next tokens that
keep it possible, for an exact masked proposal, or ``accepts(tokens, length, candidate, final)``
for one candidate, for AWRS. A prefix potential may be ``-inf`` only when
every extension is forbidden.

- ``base.py``: `Potential`, `check_potential`, `check_allowed`, `check_accepts`, `SKIP_LENGTH`.
- ``combinators.py``: `product` (sum of log-potentials), `terminal` (a reward at the end only).
- ``tokens.py``: pure-JAX potentials of the token ids: `banned_tokens`, `dfa_constraint` (a
  DFA over token ids, stored compactly as next states per token class: `TokenDFA`, `sparse_dfa`),
  `length_potential`, `exact_answer`, `token_count`.
- ``regex.py``: a Python regular expression over the decoded text (``re.fullmatch``'s language),
  compiled on the host by outlines-core to a token-level DFA (`regex_token_dfa`), as a
  `dfa_constraint` (`regex_constraint`): exact and fully in JAX at run time.
- ``json_schema.py``: a JSON Schema as outlines-core's regex of the documents it accepts
  (`json_schema_regex`), as a `regex_constraint` (`json_schema_constraint`).
- ``text.py``: any Python function of the decoded text, run on the HOST through
  ``jax.pure_callback`` (`text_reward`, `vader_sentiment`), and `text_decoder`.
- ``predicate.py``: constraints checked on the HOST one candidate token at a time (``accepts``,
  drawn by AWRS in twisted SMC): `host_constraint` (any verdict on token ids),
  `predicate_constraint` (Python predicates on the text), `python_constraint`.
- ``grammar.py``: llguidance's exact prefix checks: `lark_constraint`, `partial_json_constraint`,
  `sqlite_constraint` (extra ``constraints``).
- ``answers.py``: terminal answer checks: `math_answer` (math-verify), `humaneval_tests`
  (HumanEval's tests run in ``sandbox.py``'s `run_python`), `humaneval_problems` (extra
  ``answers``).

A vocabulary is given as ``token_bytes``, the UTF-8 bytes of every token id: `token_bytes_of`
(from `targets.lm.tokenizer`) for a byte-level BPE GGUF tokenizer, any list of strings for a toy
model.
"""
from targets.lm.potentials.answers import humaneval_problems, humaneval_tests, math_answer
from targets.lm.potentials.base import (
    SKIP_LENGTH,
    Array,
    Potential,
    check_accepts,
    check_allowed,
    check_potential,
)
from targets.lm.potentials.combinators import product, terminal
from targets.lm.potentials.grammar import (
    lark_constraint,
    llguidance_constraint,
    partial_json_constraint,
    sqlite_constraint,
)
from targets.lm.potentials.json_schema import json_schema_constraint, json_schema_regex
from targets.lm.potentials.predicate import host_constraint, predicate_constraint, python_constraint
from targets.lm.potentials.regex import regex_constraint, regex_token_dfa, rust_regex
from targets.lm.potentials.sandbox import run_python
from targets.lm.potentials.text import text_decoder, text_reward, vader_compound, vader_sentiment
from targets.lm.potentials.tokens import (
    TokenDFA,
    banned_tokens,
    dfa_constraint,
    exact_answer,
    length_potential,
    sparse_dfa,
    token_count,
)
from targets.lm.tokenizer import token_bytes_of

__all__ = [
    "SKIP_LENGTH", "Array", "Potential", "TokenDFA", "banned_tokens", "check_accepts",
    "check_allowed", "check_potential", "dfa_constraint", "exact_answer", "host_constraint",
    "humaneval_problems", "humaneval_tests", "json_schema_constraint", "json_schema_regex",
    "lark_constraint", "length_potential", "llguidance_constraint", "math_answer",
    "partial_json_constraint", "predicate_constraint", "product", "python_constraint",
    "regex_constraint", "regex_token_dfa", "run_python", "rust_regex", "sparse_dfa",
    "sqlite_constraint", "terminal", "text_decoder", "text_reward", "token_bytes_of",
    "token_count", "vader_compound", "vader_sentiment",
]
