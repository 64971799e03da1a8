"""Constrained sampling on SmolLM2-135M-Instruct: our twisted SMC against genlm-control 0.4.1.

    python -m experiments bench genlm [--particles 8] [--prompts 2] [--tokens 24]
        [--constraints regex json grammar] [--schema "json enums"] [--grammar-mask alphabet]
        [--systems ours ours-distinct genlm] [--seed 0] [--threads 2] [--out f.md]

(The defaults take about 10 minutes on a 2-core machine, genlm's JSON Schema most of it; the
README's table: ``--particles 8 32 128 --prompts 8``, genlm's JSON Schema and grammar at N = 128
or 32 on 2 prompts: it takes minutes per prompt there.) ``ours-distinct`` is ours with
``distinct_rows=True``: the model runs on the distinct unfinished particles only, as genlm's
prefix cache does. Both systems sample, for each prompt x,
from p(y | x) 1[y in L] over the answers y that end with the model's EOS (``<|im_end|>``)
within T tokens, the T-th being a forced EOS (our ``forced_eos=True``, genlm's
``max_tokens``), with N particles, systematic resampling when the ESS falls below N / 2, on the
same prompt token ids (our tokenizer's chat template) and the same weights (the GGUF: ours
through `targets.lm.load`, genlm through transformers' GGUF reader, float32 on the CPU, handed
to genlm-backend's `AsyncTransformer` as a loaded model). The languages L:

- ``regex``: `` ?\\d+\\.?`` on arithmetic prompts (suites/data/prompts.jsonl). Ours:
  `regex_constraint`, an exact masked proposal; genlm: `BoolFSA.from_regex`.
- ``json``: a JSON Schema of `experiments.benchmarks.constraints.SCHEMAS` (``--schema``),
  written into the prompt. Ours: `json_schema_constraint` (masked); genlm: `JsonSchema`.
- ``grammar``: the Lark grammar `ARITHMETIC` (integer expressions with + - * / and parentheses).
  Ours: `lark_constraint` (llguidance on the host, AWRS inside twisted SMC), by default after a
  mask to the tokens made of the grammar's bytes (`alphabet_mask`: genlm's coercion prunes its
  vocabulary the same way; ``--grammar-mask none``: AWRS over the whole vocabulary, about a
  thousand checks per token here); genlm: `BoolCFG.from_lark`.

genlm draws every token with its `AWRS` sampler (the LM potential times the constraint coerced
to the LM's tokens, as its README does for a regex and a JSON Schema; no critic).

Columns (means over the prompts): wall seconds per prompt; the satisfied mass, the normalised
weight on particles that ended with EOS and whose text passes Python's own check (``re``,
``jsonschema``, ``lark``), 0 for a prompt whose every weight is zero; the correct mass, the
part of it whose answer is right (regex: the number equals the arithmetic prompt's answer;
grammar: the expression's exact value is the one asked for; JSON: "-"); log p per token, the
weighted mean over particles of log p(y, EOS | x) / (|y| + 1), every sequence scored by ONE
scorer, our JAX model's forward pass; log Z_hat as each system reports it (ours
``log_evidence``, genlm ``Sequences.log_ml``; "(k/K prompts)": k prompts gave -inf, no particle
left, or NaN, a flagged NaN weight, which stops our run where it is); LM rows per prompt (ours:
the batch rows of every decode call, counted by a host callback, plus the prompt's prefill row;
N per step, or with ``ours-distinct`` (``distinct_rows=True``) the bucket of distinct unfinished
rows that step ran on; genlm the batch rows of every forward of its
transformers model, counted by a forward hook, its prompt included: genlm caches next-token
distributions per token prefix, so particles that share a prefix share a row); checks per
token, the constraint checks the AWRS loop asks for, over N x steps (ours: candidates handed to
``accepts``; an EOS candidate is decided by ``complete``, once per row and step, and not
counted; genlm: calls of AWRS's ``_accept``, EOS candidates included); "mask" where ours
proposes from the exact mask.

Timing: ours is one jitted program per constraint and N (prompts padded to one width); its first
call (compilation) is not timed, then each prompt runs once. genlm runs one untimed warm-up SMC
on the first prompt (2 particles, 3 tokens: torch's first calls, the constraint's set-up), then
each prompt once, its LM cache cleared before each (no prompt reuses another's prefill or
distributions); the constraints' caches stay warm on both sides (our grammar keeps its parser
states and verdicts, genlm its automata and parsers).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import fractions
import functools
import importlib.metadata
import json
import operator
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from experiments.harness import bench_cli, markdown
from experiments.harness.registry import Benchmark, register

COLUMNS = ("constraint", "N", "system", "wall s / prompt", "satisfied mass", "correct mass",
           "log p / token",
           "log Z_hat", "LM rows / prompt", "checks / token")
SYSTEMS = ("ours", "ours-distinct", "genlm")
NUMBER = r" ?\d+\.?"
ARITHMETIC = r"""start: expr
expr: term (ADD term)*
term: atom (MUL atom)*
atom: NUMBER | LPAR expr RPAR
ADD: / *[+-] */
MUL: / *[*\/] */
LPAR: /\( */
RPAR: / *\)/
NUMBER: /[0-9]+/
"""
ARITHMETIC_BYTES = b"0123456789 +-*/()"   # every byte the terminals of ARITHMETIC can match
SUBJECTS = ("a T-shirt", "a coffee mug", "a winter hat", "a pair of socks", "a scarf",
            "a poster", "a kite", "a desk lamp")
TARGETS = (24, 10, 7, 100, 12, 36, 5, 50)


class Constraint(NamedTuple):
    """A language L, its prompts, its Python check, and how each system expresses it."""

    name: str
    prompts: list[str]                            # user messages
    check: Callable[[str], bool]                  # text in L (Python's own check)
    ours: Callable[[list, Sequence[int]], Any]    # (token_bytes, special_ids) -> Potential
    genlm: Callable[[], Any]                      # () -> genlm potential over bytes
    correct: Callable[[int, str], bool] | None = None  # (prompt index, text in L) -> right answer


class Run(NamedTuple):
    """One prompt's weighted particles and costs, from either system."""

    bodies: list[tuple[int, ...]]   # generated ids before the EOS
    ended: np.ndarray               # [N] bool: ended with an EOS
    log_weights: np.ndarray         # [N] final log-weights
    log_evidence: float
    seconds: float
    lm_rows: int
    steps: int                      # SMC steps (tokens of the longest particle, EOS included)
    checks: int | None              # AWRS candidate checks; None: exact mask, no checks
    nonfinite: int = 0              # NaN / +inf log-weight increments (ours)


# ----------------------------------------------------------------------------- constraints
def regex_constraint_spec(count: int) -> Constraint:
    from experiments.suites.lm import PROMPTS, load_prompts
    from targets.lm import potentials as P

    def genlm_fsa():
        from genlm.control import BoolFSA
        return BoolFSA.from_regex(NUMBER)

    prompts = load_prompts(PROMPTS, count)

    def correct(i: int, text: str) -> bool:
        return float(text.strip().rstrip(".")) == float(prompts[i].answer)

    return Constraint(
        "regex", [p.prompt for p in prompts],
        lambda text: re.fullmatch(NUMBER, text) is not None,
        lambda tb, special: P.regex_constraint(NUMBER, tb, special_ids=special), genlm_fsa,
        correct)


def json_constraint_spec(count: int, schema_name: str) -> Constraint:
    import jsonschema

    from experiments.benchmarks.constraints import SCHEMAS
    from targets.lm import potentials as P
    schema = SCHEMAS[schema_name]
    validator = jsonschema.validators.validator_for(schema)(schema)

    def check(text: str) -> bool:
        try:
            return validator.is_valid(json.loads(text))
        except ValueError:
            return False

    def genlm_schema():
        from genlm.control import JsonSchema
        return JsonSchema(schema)

    prompts = [f"Describe {s} as one JSON value that matches this JSON Schema: "
               f"{json.dumps(schema)}. Reply with the JSON only." for s in SUBJECTS[:count]]
    return Constraint(
        f"json ({schema_name.removeprefix('json ')})", prompts, check,
        lambda tb, special: P.json_schema_constraint(schema, tb, special_ids=special),
        genlm_schema)


def alphabet_mask(token_bytes: list, alphabet: bytes):
    """A one-state token DFA that allows only the tokens made of ``alphabet``'s bytes: genlm's
    coercion keeps exactly these tokens of the LM for a byte-level constraint; a token with any
    other byte can appear in no text of the language, so the target is unchanged while our
    proposal is masked to them before AWRS checks a candidate."""
    from targets.lm import potentials as P
    allowed = set(alphabet)
    keep = [bool(b) and set(b) <= allowed for b in token_bytes]
    return P.dfa_constraint(np.where(keep, 0, -1)[None, :], 0, [True])


def grammar_constraint_spec(count: int, mask: bool) -> Constraint:
    import lark

    from targets.lm import potentials as P
    from targets.lm.potentials.grammar import lark_constraint
    parser = lark.Lark(ARITHMETIC)

    def ours(tb, special):
        grammar = lark_constraint(ARITHMETIC, tb, special_ids=special)
        return P.product(alphabet_mask(tb, ARITHMETIC_BYTES), grammar) if mask else grammar

    def check(text: str) -> bool:
        try:
            parser.parse(text)
            return True
        except lark.exceptions.LarkError:
            return False

    def genlm_cfg():
        from genlm.control import BoolCFG
        return BoolCFG.from_lark(ARITHMETIC)

    prompts = [f"Write an arithmetic expression whose value is {n}, using integers, + - * / "
               f"and parentheses. Reply with the expression only." for n in TARGETS[:count]]

    def correct(i: int, text: str) -> bool:
        return expression_value(parser.parse(text)) == TARGETS[i]

    return Constraint("grammar (lark)", prompts, check, ours, genlm_cfg, correct)


def expression_value(tree) -> fractions.Fraction | None:
    """The exact value of a parse tree of `ARITHMETIC` (None: a division by zero)."""
    import lark
    if isinstance(tree, lark.Token):
        return fractions.Fraction(int(tree)) if tree.type == "NUMBER" else None
    parts = [c for c in tree.children if not (isinstance(c, lark.Token) and c.type
                                              in ("LPAR", "RPAR"))]
    value = expression_value(parts[0])
    for op, operand in zip(parts[1::2], parts[2::2]):
        right = expression_value(operand)
        if value is None or right is None:
            return None
        symbol = op.strip()
        if symbol == "/" and right == 0:
            return None
        value = {"+": operator.add, "-": operator.sub, "*": operator.mul,
                 "/": operator.truediv}[symbol](value, right)
    return value


def constraint_specs(names: Sequence[str], count: int, schema_name: str,
                     grammar_mask: bool = True) -> list[Constraint]:
    build = {"regex": lambda: regex_constraint_spec(count),
             "json": lambda: json_constraint_spec(count, schema_name),
             "grammar": lambda: grammar_constraint_spec(count, grammar_mask)}
    return [build[name]() for name in names]


def text_of(token_bytes: list, special: frozenset, body: Sequence[int]) -> str | None:
    """The UTF-8 text of generated ids; None when a special token or invalid UTF-8 is in it."""
    if any(t in special for t in body):
        return None
    try:
        return b"".join(token_bytes[t] for t in body).decode("utf-8")
    except UnicodeDecodeError:
        return None


# ----------------------------------------------------------------------------- scoring
def make_scorer(model, params, width: int, eos: int, rows: int = 8):
    """``score(prompt_ids, bodies) -> [len(bodies)]`` log p(body, EOS | prompt) / (|body| + 1)
    by one forward pass of our model over padded rows (one compilation: ``rows`` x ``width``;
    the model is causal, so right padding leaves the scored positions alone)."""
    import jax
    import jax.numpy as jnp

    forward = jax.jit(lambda params, tokens: jax.nn.log_softmax(model.forward(params, tokens)))

    def score(prompt_ids: list[int], bodies: list[tuple[int, ...]]) -> np.ndarray:
        unique = sorted(set(bodies))
        P, out = len(prompt_ids), {}
        for start in range(0, len(unique), rows):
            chunk = unique[start:start + rows]
            tokens = np.full((rows, width), eos, np.int32)
            for r, body in enumerate(chunk):
                ids = prompt_ids + list(body) + [eos]
                tokens[r, :len(ids)] = ids
            logp = np.asarray(forward(params, jnp.asarray(tokens)))
            for r, body in enumerate(chunk):
                targets = list(body) + [eos]
                total = logp[r, np.arange(P - 1, P - 1 + len(targets)), targets].sum()
                out[body] = float(total) / len(targets)
        return np.array([out[b] for b in bodies])

    return score


# ----------------------------------------------------------------------------- ours
def counted_accepts(potential, counts: collections.Counter):
    """``potential`` whose ``accepts`` also counts the candidates it is asked about (ids >= 0:
    the AWRS loop asks -1 for rows that need no check); one host call per batch of rows, next to
    the constraint's own."""
    import jax
    import jax.numpy as jnp

    def count(candidate, ok):
        counts["checks"] += int(np.sum(np.asarray(candidate) >= 0))
        return np.asarray(ok)

    def accepts(tokens, length, candidate, final):
        ok = potential.accepts(tokens, length, candidate, final)
        # the verdict passes through the counter, so that it is never dropped as dead code
        return jax.pure_callback(count, jax.ShapeDtypeStruct((), jnp.bool_), candidate, ok,
                                 vmap_method="broadcast_all")

    return potential._replace(accepts=accepts)


def counted_rows(model, counts: collections.Counter):
    """`model` (a frozen dataclass) whose `decode` adds the rows of each call, its batch size,
    to ``counts["rows"]`` (a host callback: `distinct_rows` picks the size at run time)."""
    import dataclasses

    import jax

    class Counted(type(model)):
        def decode(self, params, prompt_cache, cache, tokens, positions):
            rows = tokens.shape[0]
            jax.debug.callback(lambda: counts.update(rows=rows))
            return super().decode(params, prompt_cache, cache, tokens, positions)

    return Counted(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})


def run_ours(constraint: Constraint, prompts: list[list[int]], N: int, T: int, seed: int,
             lm, distinct_rows: bool = False) -> list[Run]:
    """Twisted SMC on each prompt (one jitted program, compiled on the first prompt)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from targets.lm import potentials as P
    from targets.lm.twisted import twisted_smc

    model, params, tokenizer = lm
    counts = collections.Counter()
    potential = constraint.ours(P.token_bytes_of(tokenizer), sorted(tokenizer.special_ids))
    rejection = potential.accepts is not None
    if rejection:
        potential = counted_accepts(potential, counts)
    width = max(len(p) for p in prompts)
    sized = counted_rows(dataclasses.replace(model, max_len=width + T), counts)

    @jax.jit
    def program(key, params, prompt, length):
        r = twisted_smc(key, sized, params, prompt, potential, num_particles=N,
                        max_new_tokens=T, prompt_length=length, ess_threshold=0.5,
                        distinct_rows=distinct_rows)
        s = r.particles
        return (s.tokens, s.body_length, s.ended_with_eos, r.log_weights, r.log_evidence,
                r.num_steps, jnp.sum(r.nonfinite_increments))

    def call(i: int):
        padded = prompts[i] + [tokenizer.eos_id] * (width - len(prompts[i]))
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        return jax.block_until_ready(program(key, params, jnp.asarray(padded, jnp.int32),
                                             len(prompts[i])))

    call(0)   # compilation
    runs = []
    for i in range(len(prompts)):
        counts.clear()
        start = time.perf_counter()
        out = call(i)
        seconds = time.perf_counter() - start
        jax.effects_barrier()
        tokens, body_length, ended, log_w, log_z, steps, nonfinite = map(np.asarray, out)
        runs.append(Run([tuple(int(t) for t in row[:n]) for row, n in zip(tokens, body_length)],
                        ended, log_w.astype(np.float64), float(log_z), seconds,
                        counts["rows"] + 1, int(steps), counts["checks"] if rejection else None,
                        int(nonfinite)))
    return runs


# ----------------------------------------------------------------------------- genlm
@functools.lru_cache(maxsize=1)
def genlm_lm(threads: int):
    """genlm-backend's `AsyncTransformer` around transformers' float32 load of the GGUF."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from genlm.backend.llm import AsyncTransformer

    from experiments.benchmarks.decode import load_transformers
    tokenizer, model = load_transformers(threads=threads)
    return AsyncTransformer(model, tokenizer)


def run_genlm(constraint: Constraint, prompts: list[list[int]], N: int, T: int, seed: int,
              threads: int, eos_bytes: bytes) -> list[Run]:
    """genlm's AWRS SMC on each prompt (after one untimed warm-up run on the first)."""
    import torch
    from genlm.backend.tokenization import Token
    from genlm.control import AWRS, EOS, PromptedLLM

    lm = genlm_lm(threads)
    llm = PromptedLLM(lm, prompt_ids=prompts[0], eos_byte_strings=[eos_bytes])
    if llm.token_maps.eos_idxs != [lm.tokenizer.convert_tokens_to_ids(eos_bytes.decode())]:
        raise ValueError(f"genlm's EOS ids {llm.token_maps.eos_idxs} are not {eos_bytes!r}")
    sampler = AWRS(llm, constraint.genlm().coerce(llm, f=b"".join), seed=seed)
    counts = collections.Counter()
    accept = sampler._accept

    async def counted(context, token, verbosity=0):
        counts["checks"] += 1
        return await accept(context, token, verbosity)

    sampler._accept = counted   # the rejection loop looks it up on the instance

    def rows(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        counts["rows"] += int(ids.shape[0])

    def smc(i: int, particles: int = N, tokens: int = T):
        np.random.seed(seed + i)    # genlm's resampling draws from numpy's global generator
        torch.manual_seed(seed + i)
        lm.clear_cache()
        llm.prompt_ids = prompts[i]
        return asyncio.run(sampler.smc(n_particles=particles, ess_threshold=0.5,
                                       max_tokens=tokens, resampling_method="systematic"))

    smc(0, particles=2, tokens=3)   # warm-up: torch's first calls, the constraint's set-up
    hook = lm.model.register_forward_pre_hook(rows, with_kwargs=True)
    runs = []
    try:
        for i in range(len(prompts)):
            counts.clear()
            start = time.perf_counter()
            out = smc(i)
            seconds = time.perf_counter() - start
            bodies = [tuple(t.token_id for t in c if isinstance(t, Token)) for c in out.contexts]
            ended = np.array([bool(c) and c[-1] is EOS for c in out.contexts])
            runs.append(Run(bodies, ended, np.asarray(out.log_weights, np.float64),
                            float(out.log_ml), seconds, counts["rows"],
                            max(len(c) for c in out.contexts), counts["checks"]))
    finally:
        hook.remove()
    return runs


# ----------------------------------------------------------------------------- summary
@functools.lru_cache(maxsize=2)
def smollm2(scan_layers: bool):
    """(model, params, tokenizer) of SmolLM2-135M-Instruct, loaded once per process;
    ``model.max_len`` is a placeholder (each program sizes its own)."""
    from targets.lm.load import load
    return load(max_len=64, scan_layers=scan_layers)



def summarize(runs: list[Run], prompts: list[list[int]], check, text, score,
              correct=None) -> dict:
    """Means over prompts of the table's columns (see the module docstring); ``correct(i,
    text)`` judges a text of the language for prompt i (None: no correct-mass column)."""
    mass, right, logp, checks, particle_steps = [], [], [], 0, 0
    for i, (run, prompt) in enumerate(zip(runs, prompts)):
        finite = np.isfinite(run.log_weights)
        if not finite.any():
            mass.append(0.0)
            right.append(0.0)
        else:
            w = np.where(finite, np.exp(run.log_weights - run.log_weights[finite].max()), 0.0)
            w /= w.sum()
            texts = [text(b) if e else None for b, e in zip(run.bodies, run.ended)]
            ok = np.array([t is not None and check(t) for t in texts], bool)
            good = np.array([bool(k) and correct is not None and correct(i, t)
                             for k, t in zip(ok, texts)], bool)
            mass.append(float(np.sum(w[ok])))
            right.append(float(np.sum(w[good])))
            live = [b for b, f in zip(run.bodies, finite) if f]
            logp.append(float(np.dot(w[finite], score(prompt, live))))
        checks += run.checks or 0
        particle_steps += len(run.bodies) * run.steps
    return {"seconds": float(np.mean([r.seconds for r in runs])), "mass": float(np.mean(mass)),
            "correct": float(np.mean(right)) if correct is not None else None,
            "logp": float(np.mean(logp)) if logp else float("nan"),
            "log_z": float(np.mean([r.log_evidence for r in runs])),
            "log_z_nonfinite": sum(not np.isfinite(r.log_evidence) for r in runs),
            "prompts": len(runs),
            "rows": float(np.mean([r.lm_rows for r in runs])),
            "checks": None if runs[0].checks is None else checks / max(particle_steps, 1),
            "nonfinite": sum(r.nonfinite for r in runs)}


def bench(args: argparse.Namespace) -> list[dict]:
    if "genlm" in args.systems:
        from smc.optional import require
        require("genlm.control", "genlm", "the genlm benchmark")
    lm = smollm2(args.scan_layers)
    _, params, tokenizer = lm
    specs = constraint_specs(args.constraints, args.prompts, args.schema,
                             args.grammar_mask == "alphabet")
    ids = {c.name: [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in c.prompts]
           for c in specs}
    width = max(len(p) for prompts in ids.values() for p in prompts) + args.tokens
    eos = tokenizer.eos_ids[0]
    from targets.lm import potentials as P
    token_bytes = P.token_bytes_of(tokenizer)
    special = frozenset(tokenizer.special_ids)
    score = make_scorer(lm[0], params, width, eos)
    text = functools.partial(text_of, token_bytes, special)
    rows = []
    for c in specs:
        for N in args.particles:
            for system in args.systems:
                if system.startswith("ours"):
                    runs = run_ours(c, ids[c.name], N, args.tokens, args.seed, lm,
                                    distinct_rows=system == "ours-distinct")
                else:
                    runs = run_genlm(c, ids[c.name], N, args.tokens, args.seed, args.threads,
                                     token_bytes[eos])
                rows.append({"constraint": c.name, "N": N, "system": system,
                             **summarize(runs, ids[c.name], c.check, text, score, c.correct)})
                print("  " + " | ".join(cells(rows[-1])), file=sys.stderr, flush=True)
    return rows


def cells(r: dict) -> list[str]:
    """A summary row as the table's cells."""
    log_z = f"{r['log_z']:.2f}" + (f" ({r['log_z_nonfinite']}/{r['prompts']} prompts)"
                                   if r["log_z_nonfinite"] else "")
    return [r["constraint"], str(r["N"]), r["system"], f"{r['seconds']:.2f}", f"{r['mass']:.3f}",
            "-" if r["correct"] is None else f"{r['correct']:.3f}",
            f"{r['logp']:.3f}", log_z, f"{r['rows']:.0f}",
            "mask" if r["checks"] is None else f"{r['checks']:.2f}"]


def to_markdown(rows: list[dict]) -> str:
    return markdown.table(COLUMNS, map(cells, rows), [False, True, False] + [True] * 7)


def add_options(parser: argparse.ArgumentParser) -> None:
    from experiments.benchmarks.constraints import SCHEMAS
    parser.add_argument("--particles", type=int, nargs="+", default=[8],
                        help="N, particles per prompt (default %(default)s)")
    parser.add_argument("--prompts", type=int, default=2, choices=range(1, 9), metavar="K",
                        help="prompts per constraint, 1 to 8 (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=24,
                        help="T, most new tokens, the forced EOS included (default %(default)s)")
    parser.add_argument("--constraints", nargs="+", default=["regex", "json", "grammar"],
                        choices=["regex", "json", "grammar"])
    parser.add_argument("--schema", default="json enums", choices=list(SCHEMAS),
                        help="the JSON Schema of the json constraint (default %(default)s)")
    parser.add_argument("--grammar-mask", default="alphabet", choices=["alphabet", "none"],
                        help="ours, grammar: mask the proposal to the tokens made of the "
                             "grammar's bytes (as genlm's coercion does) before AWRS, or not "
                             "(AWRS over the whole vocabulary: far more checks) (default "
                             "%(default)s)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--scan-layers", action="store_true",
                        help="ours: compile the layer loop as a scan (quicker to compile, slower "
                             "to run: for smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads for genlm's transformers model (default %(default)s)")


def run(args: argparse.Namespace) -> str:
    if min(args.particles) < 1:
        raise ValueError(f"--particles must be at least 1, got {args.particles}")
    if args.tokens < 2:
        raise ValueError(f"--tokens must be at least 2 (a body and the EOS), got {args.tokens}")
    rows = bench(args)
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in
                         ("genlm-control", "genlm-backend", "torch", "transformers")
                         if "genlm" in args.systems)
    nonfinite = sum(r["nonfinite"] for r in rows)
    grammar = ("after a mask to the tokens made of the grammar's bytes, as genlm's coercion "
               "prunes" if args.grammar_mask == "alphabet" else "over the whole vocabulary")
    caption = (f"Constrained sampling on SmolLM2-135M-Instruct (float32, CPU): our twisted SMC "
               f"vs genlm-control's AWRS SMC on the same prompt ids, N, T = {args.tokens} (the "
               f"last a forced EOS), ESS threshold 0.5 and systematic resampling; "
               f"{args.prompts} prompt(s) per constraint, means over prompts. Regex "
               f"`{NUMBER}`; JSON Schema \"{args.schema}\"; a Lark grammar of arithmetic "
               f"expressions. Ours: exact masked proposal for regex / JSON, AWRS with "
               f"llguidance's host check for the grammar ({grammar}); genlm: AWRS for all "
               f"three, torch with {args.threads} thread(s). Satisfied mass: weight on particles "
               f"that ended with EOS and whose text passes Python's check; log p / token: our "
               f"model's score of each sequence (EOS included); LM rows: forward rows per "
               f"prompt; checks / token: AWRS constraint checks per particle step (details: "
               f"experiments/benchmarks/genlm.py)."
               + (f" Versions: {versions}." if versions else "")
               + (f" NaN / +inf weight increments (ours, flagged by the engine): {nonfinite}."
                  if nonfinite else "")
               + "\n\n")
    return caption + to_markdown(rows)


BENCHMARK = register(Benchmark(
    "genlm", "constrained SMC on SmolLM2: ours vs genlm-control (regex, JSON Schema, grammar)",
    add_options, run, quick=["--prompts", "1", "--particles", "4", "--tokens", "8",
                                  "--schema", "json array bounds"]))

if __name__ == "__main__":
    sys.exit(bench_cli.main(BENCHMARK))
