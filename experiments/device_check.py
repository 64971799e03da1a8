"""A fixed, small set of timings on whatever accelerator JAX sees, as one Markdown table.

    python -m experiments.device_check [--out FILE] [--budget-s 480] [--quick]
        [--items decode power fkc resampling] [--models smollm2-135m gemma3-270m]
        [--dtypes bfloat16 [float32]] [--gguf NAME=PATH ...] [--transformers auto|cpu|off]
        [--fail ITEM]                                  # or: python experiments/device_check.py

The rows (sizes of the full run; ``--quick`` shrinks every one, SmolLM2 alone in float32, so that
it runs on a 2-core CPU in about 30 s of CPU time: a smoke test whose numbers mean nothing):

- ``decode``: greedy decode tok/s of SmolLM2-135M and, if installed, Gemma 3 270M (`targets.lm.load`
  names "smollm2-135m", "gemma3-270m") in bfloat16 at B = 1, 16, 64, 256, timed as
  `experiments.benchmarks.decode` times it: ``B x (n - 1) / (t_n - t_1)`` where ``t_k`` is the
  time of `targets.lm.generate.make_generate` for ``k`` new tokens (``eos_ids=-1``: every row
  runs ``n`` tokens; prefill included in both, so it cancels); the same prompt (a chat prompt for
  SmolLM2, plain text after BOS for Gemma) repeated over the rows; ``t_k`` is the median over
  repeats. Beside it, Hugging Face transformers on the same GGUF, dtype and GPU
  (`generate(do_sample=False)`, the same ``t_n - t_1`` method, synchronised with
  ``torch.cuda.synchronize``) when JAX runs on a GPU and ``torch`` with CUDA is importable; the
  column reads "n/a" otherwise. torch is imported only then.
- ``power``: Power-SMC throughput (generated tokens/s) on SmolLM2 for P prompts x N particles
  (``jax.vmap`` of `targets.lm.power.power_smc` over prompts, as the ``power_smollm2``
  experiment runs it), next to plain batched sampling of the same P x N rows at temperature
  1/alpha (`targets.lm.generate.generate`); ``eos_ids=-1`` in both, so each row generates exactly
  T tokens and both do the same count of decode steps; the ratio is time over plain's time.
- ``fkc``: FKC (`targets.diffusion.fkc.anneal`, beta = 2, systematic resampling at ESS < N/2)
  with the digits score network (`experiments.suites.digits`) at N = 16384 and 100 steps: ms per
  whole run, beside the bare reverse SDE with the same score (`experiments.benchmarks.fkc`).
- ``resampling``: `smc.resampling.systematic` at N = 1e7 (standard-normal log-weights): ms per
  call.

Every JAX program is compiled ahead of its timing (``jit(...).lower(...).compile()``; a row's
programs compile in threads at once, and "compile s" is that wall time), run once to warm up,
then timed with ``jax.block_until_ready``; each figure is the median over repeats. Each row is
guarded: an error gives the row "failed: <reason>" and the script goes on (exit status 1 when a
row failed); Gemma 3, optional, gives "skipped: ..." when it is not installed. Once
``--budget-s`` seconds have passed, rows not yet started read "skipped: ...". Rows run cheap
first: resampling, FKC, Power-SMC, then decode (SmolLM2, then Gemma 3); the full set is meant to
take about 8 minutes on one H100, compilation most of it (not yet timed on one: the default
budget is the guard). Each model's weights are read once per dtype.

The script installs and downloads nothing. It needs jax with the accelerator's plugin, flax (the
digits network), and for the models gguf, tokenizers and jinja2; the transformers column needs
torch with CUDA and transformers. A model file can be given directly (``--gguf
smollm2-135m=PATH``), for a machine without the packages that ship the models. JAX is started
with ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.5`` (unless set), which leaves half of the GPU to torch.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import datetime
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

if __name__ == "__main__":
    # before JAX starts: leave the other half of the GPU to torch's transformers column
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    if not __package__:  # run as a file, `python experiments/device_check.py`
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from experiments.harness import markdown

ITEMS = ("decode", "power", "fkc", "resampling")
MODELS = ("smollm2-135m", "gemma3-270m")
OPTIONAL_MODELS = ("gemma3-270m",)   # "if installed": absent gives skipped rows, not failed ones
DTYPES = ("float32", "bfloat16")
COLUMNS = ("item", "setting", "unit", "ours", "reference", "ratio", "compile s", "note")
DEFAULT_BUDGET_S = 480.0


class Sizes(NamedTuple):
    """Every size of the set; `FULL` for an accelerator, `QUICK` for a smoke run on a CPU."""

    batches: tuple[int, ...]
    new_tokens: int           # n of the decode rows (t_n - t_1)
    decode_repeats: int
    prompts: int              # Power-SMC: P prompts x N particles, T tokens each
    particles: int
    tokens: int
    alpha: float
    power_repeats: int
    fkc_particles: int
    fkc_steps: int
    fkc_repeats: int
    resampling_n: int
    resampling_repeats: int
    scan_layers: bool         # layer loop as a lax.scan: quick to compile, slower to run
    models: tuple[str, ...]   # default of --models
    dtypes: tuple[str, ...]   # default of --dtypes


FULL = Sizes(batches=(1, 16, 64, 256), new_tokens=64, decode_repeats=3, prompts=8, particles=16,
             tokens=64, alpha=4.0, power_repeats=3, fkc_particles=16384, fkc_steps=100,
             fkc_repeats=5, resampling_n=10_000_000, resampling_repeats=20, scan_layers=False,
             models=MODELS, dtypes=("bfloat16",))
QUICK = Sizes(batches=(2,), new_tokens=6, decode_repeats=1, prompts=2, particles=2, tokens=2,
              alpha=4.0, power_repeats=1, fkc_particles=64, fkc_steps=5, fkc_repeats=1,
              resampling_n=100_000, resampling_repeats=2, scan_layers=True,
              models=MODELS[:1], dtypes=("float32",))   # bf16 compiles slower on a CPU


class Measured(NamedTuple):
    """One row's figures: ours, the reference's (same unit; None when absent), their ratio, and
    the seconds spent compiling ours."""

    ours: float
    reference: float | None = None
    ratio: float | None = None
    compile_s: float | None = None
    note: str = ""      # e.g. the reference's failure, when ours was measured


class Check(NamedTuple):
    """One row to run: what it is, in what unit, what its reference and ratio are, and the work."""

    item: str
    setting: str
    unit: str
    reference: str      # what the reference column holds, e.g. "transformers"
    ratio: str          # what the ratio is, e.g. "ours / transformers"
    run: Callable[[], Measured]


class Row(NamedTuple):
    check: Check
    measured: Measured | None
    note: str = ""      # "", "failed: ..." or "skipped: ..."


class Skipped(Exception):
    """Raised by a check that cannot run here for an expected reason (a model not installed)."""


# ----------------------------------------------------------------------------- small helpers
def once(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run at most once: its value, or its exception raised again on every later call (so
    that a model that fails to load fails each of its rows at once, with the same reason)."""
    memo: list = []

    def call():
        if not memo:
            try:
                memo.append((True, fn()))
            except Exception as error:  # noqa: BLE001 - re-raised below, to every caller
                memo.append((False, error))
        ok, value = memo[0]
        if not ok:
            raise value
        return value

    return call


def compile_all(programs: dict, *args) -> tuple[dict, float]:
    """``{name: compiled}`` for jitted ``programs`` at ``args``, and the wall seconds it took.

    Lowering (Python tracing) runs here one after the other; XLA compiles the programs in
    threads at once (it lets go of the GIL), since on an accelerator's host compilation is most
    of this script's time."""
    start = time.perf_counter()
    lowered = {name: fn.lower(*args) for name, fn in programs.items()}
    with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
        futures = {name: pool.submit(low.compile) for name, low in lowered.items()}
        compiled = {name: future.result() for name, future in futures.items()}
    return compiled, time.perf_counter() - start


def seconds(fn: Callable, *args) -> float:
    """Wall seconds of one call, its outputs waited for."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def one_line(error: BaseException, limit: int = 200) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def cell(value: float | None) -> str:
    """Three significant digits, whole numbers from 100 up (1,234 tok/s; 0.0412 ms)."""
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


# ----------------------------------------------------------------------------- language models
def model_source(name: str, gguf: dict[str, str]):
    """The `targets.lm.load` source of a shipped model: ``--gguf`` path, else its package's
    file; `Skipped` for an optional model whose package is absent."""
    from targets.lm.load import resolve_source
    if name in gguf:
        return Path(gguf[name])
    try:
        return resolve_source(name)
    except (ImportError, ValueError) as error:  # ValueError: gguf_loader.GGUFError
        if name in OPTIONAL_MODELS:
            raise Skipped(f"{name} not installed") from error
        raise


@functools.lru_cache(maxsize=2)
def language_model(source: Path, dtype: str, scan_layers: bool):
    """(model, params, tokenizer) read once per model and dtype; callers size ``max_len``."""
    from targets.lm.load import load
    return load(source, dtype=dtype, max_len=512, scan_layers=scan_layers)


def bench_prompt(tokenizer) -> list[int]:
    """`experiments.benchmarks.decode`'s prompt: chat for a chat model, else text after BOS."""
    from experiments.benchmarks.decode import MESSAGES, TEXT
    if tokenizer.chat_template:
        return tokenizer.encode_chat(MESSAGES)
    return tokenizer.encode(TEXT, add_bos=True)


def decode_speed(run_1: Callable[[], object], run_n: Callable[[], object], batch: int,
                 new_tokens: int, repeats: int) -> float:
    """``B x (n - 1) / (t_n - t_1)`` with each time the median over repeats (a repeat times
    ``run_1`` then ``run_n``, which generate 1 and n tokens and wait for them)."""
    times = [(seconds(run_1), seconds(run_n)) for _ in range(repeats)]
    t_1, t_n = (statistics.median(t) for t in zip(*times))
    if t_n <= t_1:
        raise ValueError(f"t_n = {t_n:.4g} s <= t_1 = {t_1:.4g} s: too few new tokens to time "
                         f"decode apart from the noise")
    return batch * (new_tokens - 1) / (t_n - t_1)


class TransformersDecoder(NamedTuple):
    """transformers' greedy ``generate`` of a GGUF on a torch device."""

    model: object
    device: str

    @classmethod
    def load(cls, source: Path, dtype: str, device: str) -> TransformersDecoder:
        import torch

        from experiments.benchmarks.decode import load_transformers
        _, model = load_transformers(str(source), threads=None, tokenizer=False)
        # a copy: `.to` converts in place, and the cached float32 model may serve another dtype
        model = copy.deepcopy(model).to(device=device, dtype=getattr(torch, dtype))
        return cls(model, device)

    def runner(self, prompt: list[int], batch: int, k: int) -> Callable[[], object]:
        import torch
        tokens = torch.tensor([prompt] * batch, device=self.device)
        mask = torch.ones_like(tokens)

        @torch.no_grad()
        def run():
            out = self.model.generate(input_ids=tokens, attention_mask=mask, do_sample=False,
                                      max_new_tokens=k, min_new_tokens=k,
                                      pad_token_id=self.model.config.eos_token_id)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()   # generate returns before the GPU is done
            return out

        return run


def transformers_device(choice: str) -> tuple[str | None, str]:
    """(torch device or None, why) for the transformers column: ``auto`` = CUDA when JAX runs on
    a GPU and torch sees CUDA; ``cpu`` forces the CPU (a check of the code path); ``off``."""
    if choice == "off":
        return None, "off (--transformers off)"
    if choice == "cpu":
        return "cpu", "torch on the CPU (--transformers cpu)"
    if jax.devices()[0].platform != "gpu":
        return None, f"n/a: JAX runs on {jax.devices()[0].platform}, not a GPU"
    try:
        import torch
    except ImportError:
        return None, "n/a: torch is not installed"
    if not torch.cuda.is_available():
        return None, f"n/a: torch {torch.__version__} has no CUDA"
    return "cuda", f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}"


def decode_checks(args, sizes: Sizes, peer_device: str | None) -> list[Check]:
    from targets.lm.generate import make_generate
    checks = []
    for name in args.models:
        for dtype in args.dtypes:
            @once
            def setup(name=name, dtype=dtype):
                source = model_source(name, args.gguf)
                model, params, tokenizer = language_model(source, dtype, sizes.scan_layers)
                prompt = bench_prompt(tokenizer)
                # a KV cache just long enough: decode attends over all of it
                model = dataclasses.replace(model, max_len=len(prompt) + sizes.new_tokens)
                return source, model, params, prompt

            @once
            def peer(name=name, dtype=dtype):
                return TransformersDecoder.load(setup()[0], dtype, peer_device)

            for batch in sizes.batches:
                def run(batch=batch, setup=setup, peer=peer):
                    _, model, params, prompt = setup()
                    n = sizes.new_tokens
                    tokens = jnp.asarray([prompt] * batch, jnp.int32)
                    lengths = jnp.full((batch,), len(prompt), jnp.int32)
                    key = jax.random.key(0)
                    programs = {k: make_generate(model, max_new_tokens=k, temperature=0.0,
                                                 eos_ids=-1) for k in (1, n)}
                    compiled, compile_s = compile_all(programs, key, params, tokens, lengths)
                    run_1, run_n = (functools.partial(compiled[k], key, params, tokens, lengths)
                                    for k in (1, n))
                    seconds(run_1), seconds(run_n)   # warm-up
                    ours = decode_speed(run_1, run_n, batch, n, sizes.decode_repeats)
                    if peer_device is None:
                        return Measured(ours, compile_s=compile_s)
                    try:   # ours stands even when the reference fails
                        theirs = peer()
                        their_1, their_n = (theirs.runner(prompt, batch, k) for k in (1, n))
                        their_1(), their_n()   # warm-up: CUDA kernels, cuBLAS handles
                        reference = decode_speed(their_1, their_n, batch, n,
                                                 sizes.decode_repeats)
                    except Exception as error:  # noqa: BLE001 - reported in the row's note
                        return Measured(ours, compile_s=compile_s,
                                        note=f"transformers failed: {one_line(error)}")
                    return Measured(ours, reference, ours / reference, compile_s)

                checks.append(Check(
                    "decode", f"{name} {dtype}, B={batch}, greedy, {sizes.new_tokens} new tokens",
                    "tok/s", "transformers", "ours / transformers", run))
    return checks


def power_check(args, sizes: Sizes) -> Check:
    from experiments.suites.lm import PROMPTS, encode_prompts, load_prompts
    from targets.lm.generate import generate
    from targets.lm.power import power_smc

    name, dtype = MODELS[0], args.dtypes[0]
    P, N, T, alpha = sizes.prompts, sizes.particles, sizes.tokens, sizes.alpha

    def run():
        model, params, tokenizer = language_model(model_source(name, args.gguf), dtype,
                                                  sizes.scan_layers)
        tokens, lengths = encode_prompts(tokenizer, load_prompts(PROMPTS, P))
        model = dataclasses.replace(model, max_len=tokens.shape[1] + T)
        tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)

        def plain(key, params, tokens, lengths):
            out = generate(key, model, params, jnp.repeat(tokens, N, axis=0),
                           jnp.repeat(lengths, N), max_new_tokens=T, temperature=1.0 / alpha,
                           eos_ids=-1)
            return out.tokens

        def power(key, params, tokens, lengths):
            one = lambda k, prompt, length: power_smc(
                k, model, params, prompt, prompt_length=length, alpha=alpha, num_particles=N,
                max_new_tokens=T, eos_ids=-1)
            result = jax.vmap(one)(jax.random.split(key, P), tokens, lengths)
            return result.particles.tokens, result.log_weights

        programs = {"plain": jax.jit(plain), "power": jax.jit(power)}
        key = jax.random.key(1)
        compiled, compile_s = compile_all(programs, key, params, tokens, lengths)
        calls = {k: functools.partial(fn, key, params, tokens, lengths)
                 for k, fn in compiled.items()}
        for call in calls.values():
            seconds(call)   # warm-up
        times = {k: [] for k in calls}
        for r in range(sizes.power_repeats):
            for k in (("plain", "power") if r % 2 == 0 else ("power", "plain")):
                times[k].append(seconds(calls[k]))
        generated = P * N * T
        ratio = statistics.median(a / b for a, b in zip(times["power"], times["plain"]))
        return Measured(generated / statistics.median(times["power"]),
                        generated / statistics.median(times["plain"]), ratio, compile_s)

    return Check("power", f"Power-SMC, {name} {dtype}, {P} prompts x {N} particles, {T} tokens, "
                 f"alpha {alpha:g}", "generated tok/s", "plain sampling",
                 "time / plain's time", run)


# ----------------------------------------------------------------------------- FKC, resampling
def fkc_check(sizes: Sizes) -> Check:
    from experiments.benchmarks.fkc import VP, bare_sampler, score_model
    from experiments.benchmarks.overhead import smc_run
    from targets.diffusion import fkc, sde

    N, steps, beta = sizes.fkc_particles, sizes.fkc_steps, 2.0

    def run():
        times = sde.time_grid(steps)
        score, dim = score_model("digits")
        model = fkc.anneal(score, beta, schedule=VP, times=times, dim=dim)
        programs = {"bare": bare_sampler(score, beta, times, N, dim),
                    "fkc": smc_run(model, N, 0.5)}
        keys = jax.random.split(jax.random.key(2), sizes.fkc_repeats + 1)
        compiled, compile_s = compile_all(programs, keys[0])
        for fn in compiled.values():
            seconds(fn, keys[0])   # warm-up
        ms = {k: [] for k in compiled}
        for r in range(1, sizes.fkc_repeats + 1):
            for k in (("bare", "fkc") if r % 2 == 0 else ("fkc", "bare")):
                ms[k].append(1e3 * seconds(compiled[k], keys[r]))
        ratio = statistics.median(f / b for f, b in zip(ms["fkc"], ms["bare"]))
        return Measured(statistics.median(ms["fkc"]), statistics.median(ms["bare"]), ratio,
                        compile_s)

    return Check("fkc", f"FKC, digits score network, N={N}, {steps} steps, beta {beta:g}, "
                 "ESS < N/2", "ms / run", "bare reverse SDE", "FKC / bare", run)


def resampling_check(sizes: Sizes) -> Check:
    import smc

    N = sizes.resampling_n

    def run():
        log_weights = jax.random.normal(jax.random.key(3), (N,), jnp.float32)
        keys = jax.random.split(jax.random.key(4), sizes.resampling_repeats + 1)
        compiled, compile_s = compile_all({"systematic": jax.jit(smc.resampling.systematic)},
                                          keys[0], log_weights)
        fn = compiled["systematic"]
        seconds(fn, keys[0], log_weights)   # warm-up
        ms = [1e3 * seconds(fn, key, log_weights) for key in keys[1:]]
        return Measured(statistics.median(ms), compile_s=compile_s)

    return Check("resampling", f"systematic, N={N:.0e}", "ms / call", "", "", run)


# ----------------------------------------------------------------------------- the run
def plan(args: argparse.Namespace, peer_device: str | None = None) -> list[Check]:
    """Every row of the table, in order; nothing is loaded or compiled until a row runs."""
    sizes = QUICK if args.quick else FULL
    builders = {"decode": lambda: decode_checks(args, sizes, peer_device),
                "power": lambda: [power_check(args, sizes)],
                "fkc": lambda: [fkc_check(sizes)],
                "resampling": lambda: [resampling_check(sizes)]}
    checks = []
    for item in ("resampling", "fkc", "power", "decode"):   # cheap first, optional Gemma last
        if item in args.items:
            checks += [forced(c) if item in args.fail else c for c in builders[item]()]
    return checks


def forced(check: Check) -> Check:
    """The check with its work replaced by an error (``--fail``: to see the guard work)."""
    def run():
        raise RuntimeError(f"forced by --fail {check.item}")
    return check._replace(run=run)


def run_checks(checks: Sequence[Check], budget_s: float,
               log: Callable[[str], None] = lambda line: None) -> list[Row]:
    """Each check guarded: a row with its figures, or with "failed: ..." / "skipped: ..."."""
    start = time.perf_counter()
    rows = []
    for check in checks:
        spent = time.perf_counter() - start
        if spent > budget_s:
            row = Row(check, None, f"skipped: the {budget_s:g} s budget (--budget-s) was spent")
        else:
            try:
                row = Row(check, check.run())
            except Skipped as reason:
                row = Row(check, None, f"skipped: {reason}")
            except Exception as error:  # noqa: BLE001 - any failure becomes its row's note
                row = Row(check, None, f"failed: {one_line(error)}")
        rows.append(row)
        log(f"[{time.perf_counter() - start:6.1f} s] {check.item}: {check.setting}: "
            f"{row.note or f'{row.measured.ours:.4g} {check.unit}'}")
    return rows


def to_markdown(rows: Sequence[Row], reference_note: str) -> str:
    def cells(row: Row) -> list[str]:
        c, m = row.check, row.measured
        reference = ("" if m is None or m.reference is None
                     else f"{c.reference}: {cell(m.reference)}")
        if c.item == "decode" and m is not None and m.reference is None and not m.note:
            reference = reference_note   # why there is no transformers figure
        ratio = "" if m is None or m.ratio is None else f"{m.ratio:.2f} ({c.ratio})"
        note = (row.note or (m.note if m else "")).replace("|", "/")
        return [c.item, c.setting, c.unit, "" if m is None else cell(m.ours), reference, ratio,
                "" if m is None else cell(m.compile_s), note]

    return markdown.table(COLUMNS, [cells(r) for r in rows],
                          [False, False, False, True, False, False, True, False])


def device_line() -> str:
    devices = jax.devices()
    return (f"{devices[0].device_kind} ({devices[0].platform}, {len(devices)} device"
            f"{'s' if len(devices) > 1 else ''})")


def report(rows: Sequence[Row], args: argparse.Namespace, reference_note: str,
           total_s: float, today: datetime.date | None = None) -> str:
    today = today or datetime.date.today()
    command = " ".join(["python -m experiments.device_check", *args.argv])
    sizes = QUICK if args.quick else FULL
    head = (
        f"Device check on {device_line()}, jax {jax.__version__}, {today.isoformat()}: "
        f"{total_s:.0f} s in all (budget {args.budget_s:g} s). Command: `{command}`.\n\n"
        f"Ours: compiled ahead (compile s = that row's programs), warmed up, timed with "
        f"jax.block_until_ready, median over repeats. decode: greedy, B x (n - 1) / (t_n - t_1) "
        f"for n = {sizes.new_tokens} new tokens (t_k: median time of k new tokens), one prompt repeated over the batch; reference: "
        f"{reference_note}. power: P x N x T generated tokens over the wall time, Power-SMC "
        f"(jax.vmap over prompts) against plain sampling of the same rows at temperature "
        f"1/alpha, no EOS stop. fkc: one whole FKC run against the bare reverse SDE. "
        f"resampling: one call on standard-normal log-weights."
        f"{' --quick: tiny sizes, numbers meaningless.' if args.quick else ''}\n\n")
    return head + to_markdown(rows, reference_note)


def gguf_override(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or name not in MODELS or not path:
        raise argparse.ArgumentTypeError(f"--gguf wants NAME=PATH with NAME one of "
                                         f"{', '.join(MODELS)}, got {text!r}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"--gguf {name}: no file at {path!r}")
    return name, path


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.device_check",
        description="A fixed, small set of timings on whatever accelerator JAX sees.")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="rows not started after this many seconds are skipped "
                             "(default %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes that run on a CPU (a smoke test; numbers meaningless)")
    parser.add_argument("--items", nargs="+", choices=ITEMS, default=list(ITEMS))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=None,
                        help="decode rows' models (default: both; --quick: SmolLM2)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None,
                        help="decode rows' dtypes; Power-SMC uses the first (default: bfloat16; "
                             "--quick: float32)")
    parser.add_argument("--gguf", type=gguf_override, action="append", default=[],
                        metavar="NAME=PATH", help="read a model from this GGUF file instead of "
                                                  "its package")
    parser.add_argument("--transformers", choices=("auto", "cpu", "off"), default="auto",
                        help="the decode rows' reference: auto = on the GPU when JAX and torch "
                             "both have one")
    parser.add_argument("--fail", nargs="+", choices=ITEMS, default=[],
                        help="make these items' rows raise (to check that the others still run)")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s:g}")
    args.gguf = dict(args.gguf)
    sizes = QUICK if args.quick else FULL
    args.models = args.models or list(sizes.models)
    args.dtypes = args.dtypes or list(sizes.dtypes)
    args.argv = list(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    peer_device, reference_note = transformers_device(
        args.transformers if "decode" in args.items else "off")
    log = lambda line: print(line, file=sys.stderr, flush=True)
    log(f"device check on {device_line()}, jax {jax.__version__}; transformers: {reference_note}")
    rows = run_checks(plan(args, peer_device), args.budget_s, log)
    text = report(rows, args, reference_note, time.perf_counter() - start)
    markdown.emit(text, args.out)
    return 1 if any(row.note.startswith("failed") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
