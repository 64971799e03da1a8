"""Decode and prefill speed of a shipped model: our JAX transformer against Hugging Face
transformers (torch), on the same GGUF file and in the same dtype.

    python -m experiments bench decode [--model smollm2-135m|gemma3-270m] [--dtype float32|bfloat16]
        [--batches 1 16 64] [--new-tokens 64] [--repeats 5] [--threads 2] [--out f.md]

Both frameworks load the same GGUF, take the same prompt token ids (SmolLM2: a chat prompt;
Gemma 3 270M, a base model without a chat template: plain text after BOS; encoded by our
tokenizer, which tests/test_lm_transformers.py and tests/test_lm_tokenizer.py check against
transformers'), repeated over the batch rows (no padding), and decode greedily for exactly ``--new-tokens`` tokens (ours: `targets.lm.generate`
with ``eos_ids=-1``, which never stops; transformers: ``generate(do_sample=False,
min_new_tokens=n, max_new_tokens=n)``). Our KV cache holds prompt + new tokens (``max_len``);
transformers grows its dynamic cache. Decode speed is ``batch x (n - 1) / (t_n - t_1)`` where
``t_k`` is the time to generate ``k`` tokens (prefill included in both, so it cancels); prefill
is timed apart (one forward over the prompt that fills the cache and gives the next-token
distribution; transformers with ``logits_to_keep=1``, as its ``generate`` does). Each framework runs in its own
worker process pinned to the same ``--threads`` cores (torch ``set_num_threads``, XLA's pool on
the pinned cores), so that the peak resident memory (``ru_maxrss``) is its own: batches run in
increasing order and the peak after a batch is the high-water mark up to it. After a warm-up run
per batch (compilation), the workers are timed back to back, alternating which goes first, and
every number is the median over repeats; the ratio is the median of the per-repeat ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from experiments.harness import bench_cli, markdown
from experiments.harness.registry import Benchmark, register

FRAMEWORKS = ("ours", "transformers")
MESSAGES = [{"role": "user", "content": "Name three colours and say why you like them."}]
TEXT = "Three colours I like, and why: first,"   # for models without a chat template
MODELS = ("smollm2-135m", "gemma3-270m")
DTYPES = ("float32", "bfloat16")
COLUMNS = ("batch", "ours tok/s", "transformers tok/s", "ours / transformers",
           "ours prefill ms", "transformers prefill ms", "ours peak RSS MiB",
           "transformers peak RSS MiB")
RESULT = "RESULT "  # prefix of the worker's answer lines (libraries may print to stdout too)


# ----------------------------------------------------------------------------- transformers
@contextlib.contextmanager
def memoised_gguf(path):
    """transformers re-parses the GGUF for config, tokenizer and weights and rebuilds gguf's
    tensor-name map once per tensor (~400 times): reuse our cached reader of the file and memoise
    the map, which changes nothing loaded and cuts the load time about threefold."""
    import gguf

    from targets.lm.gguf_loader import open_gguf
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    parsed = open_gguf(path)
    same = os.path.realpath(path)
    gguf.GGUFReader = lambda p, *args, **kwargs: (
        parsed if os.path.realpath(p) == same else reader(p, *args, **kwargs))
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


@functools.lru_cache(maxsize=1)
def load_transformers(path=None, threads: int | None = 2, tokenizer: bool = True):
    """``(tokenizer, model)`` of a GGUF with transformers' own loader (fp32, eval mode); the last
    one loaded is kept (tests and the in-process smoke run share it). ``tokenizer=False`` skips
    transformers' conversion of the vocabulary (half a minute for Gemma's): ``(None, model)``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from targets.lm.gguf_loader import default_gguf_path
    if threads:
        torch.set_num_threads(threads)
    logging.disable_progress_bar()
    path = default_gguf_path() if path is None else path
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    with memoised_gguf(path):
        tokenizer = (AutoTokenizer.from_pretrained(folder, gguf_file=name) if tokenizer
                     else None)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tokenizer, model.eval()


# ----------------------------------------------------------------------------- workers
def prompt_ids(model_name: str) -> list[int]:
    """The benchmark's prompt for a shipped model, encoded by our tokenizer."""
    from targets.lm.load import resolve_source
    from targets.lm.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_gguf(resolve_source(model_name))
    if tokenizer.chat_template:
        return tokenizer.encode_chat(MESSAGES)
    return tokenizer.encode(TEXT, add_bos=True)


def eos_ids(model_name: str) -> list[int]:
    from targets.lm.load import resolve_source
    from targets.lm.tokenizer import Tokenizer
    return list(Tokenizer.from_gguf(resolve_source(model_name)).eos_ids)


def _ours(model_name: str, dtype: str, new_tokens: int, scan_layers: bool):
    """(prompt ids, kv bytes, {"prefill", "generate"}) for our model; calls return row 0's ids."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from targets.lm.generate import make_generate
    from targets.lm.load import load

    prompt = prompt_ids(model_name)
    # a KV cache just long enough: decode attends over all of it
    model, params, _ = load(model_name, dtype=dtype, max_len=len(prompt) + new_tokens,
                            scan_layers=scan_layers)
    prefill = jax.jit(model.prefill)
    programs = {k: make_generate(model, max_new_tokens=k, temperature=0.0, eos_ids=-1)
                for k in (1, new_tokens)}

    def inputs(batch):
        return jnp.asarray([prompt] * batch, jnp.int32), jnp.full((batch,), len(prompt))

    def run_prefill(batch):
        return jax.block_until_ready(prefill(params, *inputs(batch)))

    def run_generate(batch, k):
        out = jax.block_until_ready(programs[k](jax.random.key(0), params, *inputs(batch)))
        return np.asarray(out.tokens[0]).tolist()

    return prompt, model.kv_bytes_per_token(), run_prefill, run_generate


def _transformers(model_name: str, dtype: str, new_tokens: int, threads: int):
    import torch

    from targets.lm.load import resolve_source
    prompt = prompt_ids(model_name)
    _, model = load_transformers(resolve_source(model_name), threads=threads, tokenizer=False)
    model = model.to(getattr(torch, dtype))
    c = model.config
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (
        torch.finfo(getattr(torch, dtype)).bits // 8)

    def inputs(batch):
        tokens = torch.tensor([prompt] * batch)
        return tokens, torch.ones_like(tokens)

    @torch.no_grad()
    def run_prefill(batch):
        tokens, mask = inputs(batch)
        return model(input_ids=tokens, attention_mask=mask, use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def run_generate(batch, k):
        tokens, mask = inputs(batch)
        out = model.generate(input_ids=tokens, attention_mask=mask, do_sample=False,
                             max_new_tokens=k, min_new_tokens=k,
                             pad_token_id=model.config.eos_token_id)
        return out[0, len(prompt):].tolist()

    return prompt, kv_bytes, run_prefill, run_generate


def _setup(framework: str, options: dict):
    if framework == "ours":
        return _ours(options["model"], options["dtype"], options["new_tokens"],
                     options["scan_layers"])
    return _transformers(options["model"], options["dtype"], options["new_tokens"],
                         options["threads"])


def measure(run_prefill, run_generate, batch: int, new_tokens: int) -> dict:
    """Times of a prefill and of generating 1 and ``new_tokens`` tokens; row 0's tokens."""
    times = {}
    for name, call, args in (("prefill", run_prefill, (batch,)),
                             ("gen_1", run_generate, (batch, 1)),
                             ("gen_n", run_generate, (batch, new_tokens))):
        start = time.perf_counter()
        out = call(*args)
        times[name] = time.perf_counter() - start
    return {**times, "tokens": out,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def worker(framework: str, options: dict) -> None:
    """Answer one JSON line per request line ``{"batch": B}`` on stdin."""
    with contextlib.suppress(AttributeError, OSError):  # same cores for both frameworks
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:options["threads"]])
    prompt, kv_bytes, run_prefill, run_generate = _setup(framework, options)
    print(RESULT + json.dumps({"prompt_tokens": len(prompt), "kv_bytes": kv_bytes,
                               "eos_ids": eos_ids(options["model"])}), flush=True)
    for line in sys.stdin:
        batch = json.loads(line)["batch"]
        answer = measure(run_prefill, run_generate, batch, options["new_tokens"])
        print(RESULT + json.dumps(answer), flush=True)


class InProcess:
    """The same work in this process (a quick smoke run: shares memory and loaded models)."""

    def __init__(self, framework: str, options: dict):
        self.new_tokens = options["new_tokens"]
        prompt, kv_bytes, *self.calls = _setup(framework, options)
        self.facts = {"prompt_tokens": len(prompt), "kv_bytes": kv_bytes,
                      "eos_ids": eos_ids(options["model"])}

    def read(self) -> dict:
        return self.facts

    def ask(self, batch: int) -> dict:
        return measure(*self.calls, batch, self.new_tokens)

    def close(self) -> None:
        pass


class Worker:
    """A worker subprocess for one framework, spoken to in JSON lines."""

    def __init__(self, framework: str, options: dict):
        self.framework = framework
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in close()
        env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "experiments.benchmarks.decode", "--worker", framework,
             "--options", json.dumps(options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
        self.stderr.seek(0)
        raise RuntimeError(f"the {self.framework} worker died:\n{self.stderr.read()[-3000:]}")

    def ask(self, batch: int) -> dict:
        self.proc.stdin.write(json.dumps({"batch": batch}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.stderr.close()


def _until_eos(tokens: list[int], eos: list[int]) -> list[int]:
    ends = [i for i, t in enumerate(tokens) if t in eos]
    return tokens[:ends[0] + 1] if ends else tokens


def bench(batches: list[int], new_tokens: int, repeats: int, threads: int,
          scan_layers: bool = False, in_process: bool = False, model: str = MODELS[0],
          dtype: str = "float32") -> dict:
    """Per batch and framework: lists over repeats of the times, and the workers' facts."""
    if model not in MODELS or dtype not in DTYPES:
        raise ValueError(f"model must be one of {MODELS} and dtype one of {DTYPES}, got "
                         f"{model!r}, {dtype!r}")
    if new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2 (decode speed uses t_n - t_1), "
                         f"got {new_tokens}")
    kind = InProcess if in_process else Worker
    options = {"model": model, "dtype": dtype, "new_tokens": new_tokens, "threads": threads,
               "scan_layers": scan_layers}
    workers = {fw: kind(fw, options) for fw in FRAMEWORKS}
    try:
        facts = {fw: w.read() for fw, w in workers.items()}
        runs = {b: {fw: [] for fw in FRAMEWORKS} for b in batches}
        for batch in sorted(batches):  # increasing, so that the peak RSS is this batch's
            for w in workers.values():
                w.ask(batch)  # warm-up: compilation, caches
            for r in range(repeats):
                order = FRAMEWORKS if r % 2 == 0 else FRAMEWORKS[::-1]
                for fw in order:
                    runs[batch][fw].append(workers[fw].ask(batch))
    finally:
        for w in workers.values():
            w.close()
    return {"facts": facts, "runs": runs}


def summarise(result: dict, new_tokens: int) -> list[dict]:
    rows = []
    for batch, by_fw in result["runs"].items():
        def speed(run, batch=batch):
            return batch * (new_tokens - 1) / (run["gen_n"] - run["gen_1"])

        row = {"batch": batch}
        for fw, runs in by_fw.items():
            row[fw] = {"tok_s": statistics.median(speed(x) for x in runs),
                       "prefill_ms": 1e3 * statistics.median(x["prefill"] for x in runs),
                       "peak_rss_mib": max(x["peak_rss_mib"] for x in runs),
                       "tokens": runs[-1]["tokens"]}
        row["ratio"] = statistics.median(
            speed(a) / speed(b) for a, b in zip(by_fw["ours"], by_fw["transformers"]))
        rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    cells = ([str(r["batch"]), f"{r['ours']['tok_s']:.1f}", f"{r['transformers']['tok_s']:.1f}",
              f"{r['ratio']:.2f}", f"{r['ours']['prefill_ms']:.0f}",
              f"{r['transformers']['prefill_ms']:.0f}", f"{r['ours']['peak_rss_mib']:.0f}",
              f"{r['transformers']['peak_rss_mib']:.0f}"] for r in rows)
    return markdown.table(COLUMNS, cells, [True] * len(COLUMNS))


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default=MODELS[0])
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="cores/threads per framework")
    parser.add_argument("--scan-layers", action="store_true",
                        help="ours with the layer loop as a lax.scan (quick compile, slower)")
    parser.add_argument("--in-process", action="store_true",
                        help="no worker processes (smoke test: peak RSS is then shared)")


def worker_main(argv: list[str]) -> None:
    """A `Worker` process: `--worker FRAMEWORK --options JSON` (the run's `bench` options)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=FRAMEWORKS, required=True)
    parser.add_argument("--options", type=json.loads, required=True)
    args = parser.parse_args(argv)
    worker(args.worker, args.options)


def run(args: argparse.Namespace) -> str:
    result = bench(args.batches, args.new_tokens, args.repeats, args.threads, args.scan_layers,
                   args.in_process, args.model, args.dtype)
    rows = summarise(result, args.new_tokens)
    facts = result["facts"]
    eos = facts["ours"]["eos_ids"]  # greedy continuations compared up to the first EOS
    same = all(_until_eos(r["ours"]["tokens"], eos) == _until_eos(r["transformers"]["tokens"], eos)
               for r in rows)
    described = {"smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
                 "gemma3-270m": "Gemma 3 270M (Q4_K_M GGUF)"}[args.model]
    kind = "chat" if args.model == "smollm2-135m" else "plain-text"
    caption = (
        f"Decode speed: {described} dequantised to {args.dtype}, a "
        f"{facts['ours']['prompt_tokens']}-token {kind} prompt, {args.new_tokens} new tokens per "
        f"row, greedy, no early stop; ours = JAX (`targets.lm`), transformers = torch "
        f"{args.dtype} `generate`, each in its own process on {args.threads} core(s). tok/s = "
        f"batch x (n - 1) / (t_n - t_1), median over {args.repeats} repeats; ratio = median of "
        f"per-repeat ratios; prefill = one forward over the prompts that fills the cache and "
        f"gives the next-token distribution; peak RSS = the process's high-water mark after "
        f"that batch. KV cache per particle-token: ours {facts['ours']['kv_bytes']} B, "
        f"transformers {facts['transformers']['kv_bytes']} B (layers x 2 x kv_heads x head_dim x "
        f"bytes per value). Greedy tokens of row 0 identical in both: "
        f"{'yes' if same else 'NO'}.\n\n")
    return caption + to_markdown(rows)


def options_for(model: str):
    """`add_options` with ``--model`` defaulting to `model` (one registered benchmark each)."""
    def add(parser: argparse.ArgumentParser) -> None:
        add_options(parser)
        parser.set_defaults(model=model)
    return add


QUICK = ["--batches", "1", "2", "--new-tokens", "3", "--repeats", "1", "--threads", "1",
         "--scan-layers", "--in-process"]
BENCHMARK = register(Benchmark(
    "decode", "decode and prefill speed on SmolLM2-135M: ours vs transformers (torch)",
    add_options, run, quick=QUICK, repeats=5))
GEMMA3_BENCHMARK = register(Benchmark(
    "decode-gemma3", "decode and prefill speed on Gemma 3 270M: ours vs transformers (torch)",
    options_for("gemma3-270m"), run, quick=QUICK, repeats=5))

if __name__ == "__main__":
    if "--worker" in sys.argv:  # a `Worker` process of a run
        worker_main(sys.argv[1:])
    else:
        sys.exit(bench_cli.main(BENCHMARK))
