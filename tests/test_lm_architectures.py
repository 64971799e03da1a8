"""Every architecture we load, end to end against Hugging Face transformers.

For each architecture (llama with biases and tied embeddings, llama with Llama 3 RoPE scaling and
an untied head, mistral with a sliding window, qwen2, qwen3, gemma3 with mixed sliding/global
layers and a final soft cap), `tests/hf_tiny.py` has transformers build a tiny random model and
save it as a Hugging Face folder; `targets.lm.load` reads the folder and we compare with
transformers' own torch model on the same folder:

- every position's logits of three prompts of different lengths, one longer than the sliding
  window, run in one right-padded batch by us (each followed by its greedy continuation) and
  one at a time by transformers;
- prefill and decode against forward: the log-probabilities after prefill, and the log-probability
  of every decoded token, equal forward's on the whole sequence;
- 32 greedy tokens equal transformers' ``generate``, and so do their log-probabilities at
  every step;
- the same in bfloat16 with a tolerance derived from bfloat16 rounding (`bf16_tolerance`),
  except that greedy decoding (16 tokens) may part at a near tie: bfloat16 logits lie on a grid
  of spacing 2^-7 |logit| (1/16 near 10), and with a few hundred tokens transformers' own top
  two are often within that grid, even exactly tied; the tokens before it must agree;
- the EOS ids of ``generation_config.json`` end sampled rows; every LM algorithm runs.

Compile time is the budget: float32 runs the unrolled layer loop (what `load` gives by default)
and bfloat16 the scanned one (``scan_layers=True``, whose per-layer sliding/global choice is a
traced flag), so both loops meet transformers; each (architecture, dtype) compiles one program.
"""
import math
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (pip install -e '.[bench]')")
transformers = pytest.importorskip("transformers", reason="needs transformers (the bench extra)")

import hf_tiny
import jax
import jax.numpy as jnp

from targets.lm import potentials as P
from targets.lm.generate import generate
from targets.lm.load import load
from targets.lm.mh_power import mh_power
from targets.lm.power import power_smc
from targets.lm.twisted import twisted_smc

TEXTS = ["Hi there", "def f(x): return 42", "The quick brown fox jumps over the lazy dog."]
NEW_TOKENS = 32
BF16_GREEDY = 16          # bfloat16 greedy tokens compared (up to the first near tie)
MAX_LEN = 64              # one cache length for every model: prompts + NEW_TOKENS fit
FP32_RTOL = 1e-4          # of the spread of transformers' logits
U_BF16 = 2.0 ** -8        # unit roundoff of bfloat16 (8 significant bits)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # torch's OpenMP threads slow down several-fold on a loaded 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tiny")
    return {arch: hf_tiny.build_tiny(arch, root / arch) for arch in hf_tiny.ARCHS}


# ------------------------------------------------------------------------------- transformers
def hf_model(folder, dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager")
    model.generation_config.eos_token_id = None  # greedy runs all NEW_TOKENS, as ours (eos_ids=-1)
    return model.to(dtype).eval()


def hf_reference(model, prompts):
    """Per prompt alone: logits [P, V] and greedy tokens [NEW_TOKENS] with their logits."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0].float().numpy()
            gen = model.generate(input_ids=x, do_sample=False, max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=hf_tiny.PAD)
            steps = torch.stack(gen.logits)[:, 0].float().numpy()
            out.append((logits, gen.sequences[0, len(ids):].numpy(), steps))
    return out


# ------------------------------------------------------------------------------- ours
def our_program(model):
    """One compiled program: prefill, NEW_TOKENS greedy tokens, and forward on the batch of each
    prompt followed by its greedy continuation, right-padded (its logits at the prompt
    positions are those of the prompts alone: the model is causal)."""
    def run(params, prompts, lengths):
        _, prefill_logp = model.prefill(params, prompts, lengths)
        greedy = generate(jax.random.key(0), model, params, prompts, lengths,
                          max_new_tokens=NEW_TOKENS, temperature=0.0, eos_ids=-1)
        B, W = prompts.shape
        full = jnp.zeros((B, W + NEW_TOKENS), jnp.int32).at[:, :W].set(prompts)
        full = full.at[jnp.arange(B)[:, None], lengths[:, None] + jnp.arange(NEW_TOKENS)].set(
            greedy.tokens)
        return prefill_logp, greedy, model.forward(params, full)
    return jax.jit(run)


class Case:
    """One architecture in one dtype: our outputs and transformers' on the same prompts."""

    def __init__(self, arch, folder, dtype):
        self.arch, self.dtype = arch, dtype
        self.model, self.params, self.tok = load(folder, dtype=dtype, max_len=MAX_LEN,
                                                 scan_layers=dtype == "bfloat16")
        self.prompts = [self.tok.encode(text) for text in TEXTS]
        self.lengths = np.array([len(p) for p in self.prompts], np.int32)
        width = int(self.lengths.max())
        assert width + NEW_TOKENS <= MAX_LEN
        self.padded = np.full((len(TEXTS), width), self.tok.pad_id, np.int32)
        for row, ids in enumerate(self.prompts):
            self.padded[row, :len(ids)] = ids
        outs = our_program(self.model)(self.params, jnp.asarray(self.padded),
                                       jnp.asarray(self.lengths))
        self.prefill_logp, self.greedy, self.logits = jax.tree.map(
            lambda x: np.asarray(x, np.float64) if x.dtype.kind == "f" else np.asarray(x), outs)
        self.hf = hf_model(folder, getattr(torch, dtype))
        self.reference = hf_reference(self.hf, self.prompts)

    def theirs_logits(self):
        """transformers' logits of every real position, rows concatenated [sum P, V]."""
        return np.concatenate([ref[0] for ref in self.reference]).astype(np.float64)

    def ours_logits(self):
        return np.concatenate([self.logits[row, :n] for row, n in enumerate(self.lengths)])

    def tolerance(self, theirs):
        if self.dtype == "float32":
            return FP32_RTOL * theirs.std()
        return bf16_tolerance(theirs, self.model.config.n_layers)


def bf16_tolerance(theirs, n_layers, roundings_per_layer=16, logit_roundings=4):
    """Largest |ours - theirs| expected from bfloat16 rounding alone, for logits `theirs`.

    Both models hold the same bfloat16 weights (the float32 file rounded to nearest), so only
    the rounding of activations differs. Each bfloat16 rounding multiplies a value by (1 + d),
    |d| <= u = 2^-8, d uniform: standard deviation u / sqrt(3). Two sources, added:

    - the logits themselves are rounded up to ``logit_roundings`` = 4 times after the last
      product (the lm_head output; transformers' Gemma soft cap divides, takes tanh and
      multiplies in bfloat16), each moving a logit by at most u |logit|: 4 u max|theirs|;
    - every rounding upstream (per layer at most k = 16: norm output, q/k/v, RoPE, attention
      weights and output, o-projection, residual sum, norm, gate/up, activation, product, down,
      Gemma's two extra norms; plus the embedding and final norm, counted as one more layer)
      perturbs the residual stream by a relative u / sqrt(3), and the normalised layers pass
      it to the logits with a gain of order one. Independent roundings in two models add in
      quadrature: a per-logit standard deviation u std(theirs) sqrt(2 k (L + 1) / 3); the
      maximum over the n compared logits of such Gaussian errors is at most sqrt(2 ln n)
      standard deviations.

    Tolerance = u (4 max|theirs| + sqrt(2 ln n) sqrt(2 k (L + 1) / 3) std(theirs)); no constant
    in it is fitted to the observed differences.
    """
    spread = math.sqrt(2 * roundings_per_layer * (n_layers + 1) / 3)
    extreme = math.sqrt(2 * math.log(theirs.size))
    return U_BF16 * (logit_roundings * np.abs(theirs).max() + extreme * spread * theirs.std())


@pytest.fixture(scope="module", params=hf_tiny.ARCHS)
def fp32(request, folders):
    return Case(request.param, folders[request.param], "float32")


@pytest.fixture(scope="module", params=hf_tiny.ARCHS)
def bf16(request, folders):
    return Case(request.param, folders[request.param], "bfloat16")


# ------------------------------------------------------------------------------- tests
def log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def check_logits(case):
    theirs = case.theirs_logits()
    diff = np.abs(case.ours_logits() - theirs).max()
    tol = case.tolerance(theirs)
    assert diff <= tol, f"{case.arch} {case.dtype}: max |ours - theirs| {diff:.3g} > {tol:.3g}"


def check_prefill_and_decode(case):
    """Prefill's next-token log-probs, and every greedy token's log-prob from decode, equal
    log_softmax of forward's logits on the whole sequence."""
    forward_logp = log_softmax(case.logits)
    tol = case.tolerance(case.logits)
    rows = np.arange(len(case.lengths))
    last = forward_logp[rows, case.lengths - 1]
    assert np.abs(case.prefill_logp - last).max() <= tol, case.arch
    positions = case.lengths[:, None] + np.arange(NEW_TOKENS) - 1  # predicting token j
    teacher = np.take_along_axis(forward_logp[rows[:, None], positions],
                                 case.greedy.tokens[..., None], axis=-1)[..., 0]
    assert np.abs(case.greedy.token_logp - teacher).max() <= 2 * tol, case.arch


def check_greedy(case, n_tokens, near_ties_allowed):
    """The first `n_tokens` greedy tokens equal transformers', and so do their log-probs.

    With `near_ties_allowed`, the rows may part at a step where transformers' logits of its
    token and of ours are within the tolerance of each other (rounding may then pick either);
    the tokens before it are compared."""
    for row, (_, tokens, steps) in enumerate(case.reference):
        ours = case.greedy.tokens[row, :n_tokens]
        tol = 2 * case.tolerance(steps.astype(np.float64))  # two logits, each within tolerance
        differ = np.flatnonzero(ours != tokens[:n_tokens])
        agreed = int(differ[0]) if differ.size else n_tokens
        if agreed < n_tokens:
            gap = steps[agreed, tokens[agreed]] - steps[agreed, ours[agreed]]
            assert near_ties_allowed and gap <= tol, (
                f"{case.arch} {case.dtype} row {row}: token {agreed} differs (ours "
                f"{ours[agreed]}, theirs {tokens[agreed]}); their logit gap {gap:.3g}, "
                f"tolerance {tol:.3g}")
        theirs_logp = np.take_along_axis(log_softmax(steps), tokens[:, None], axis=-1)[:, 0]
        diff = np.abs(case.greedy.token_logp[row, :agreed] - theirs_logp[:agreed])
        assert (diff <= tol).all(), (case.arch, case.dtype, row, diff.max(), tol)


def test_tokenizer_matches_transformers(fp32):
    hf_tok = transformers.AutoTokenizer.from_pretrained(fp32.hf.name_or_path)
    for text, ids in zip(TEXTS, fp32.prompts, strict=True):
        assert ids == hf_tok(text)["input_ids"]


def test_logits_match_fp32(fp32):
    check_logits(fp32)


def test_prefill_and_decode_match_forward_fp32(fp32):
    check_prefill_and_decode(fp32)


def test_greedy_matches_fp32(fp32):
    check_greedy(fp32, NEW_TOKENS, near_ties_allowed=False)


def test_logits_match_bf16(bf16):
    check_logits(bf16)


def test_prefill_and_decode_match_forward_bf16(bf16):
    check_prefill_and_decode(bf16)


def test_greedy_matches_bf16(bf16):
    check_greedy(bf16, BF16_GREEDY, near_ties_allowed=True)


def test_bfloat16_checkpoint_reads_as_the_rounded_float32_one(folders, tmp_path):
    """A folder saved in bfloat16 (as most hub checkpoints are) loads as the float32 one rounded
    to bfloat16: every parameter within one rounding (relative u = 2^-8; Gemma's norms are
    1 + w with w rounded, so within u |1 + w| too)."""
    bf16_folder = hf_tiny.build_tiny("gemma3", tmp_path / "gemma3_bf16", dtype="bfloat16")
    _, ours, _ = load(bf16_folder, max_len=MAX_LEN)
    _, reference, _ = load(folders["gemma3"], max_len=MAX_LEN)
    leaves = jax.tree_util.tree_leaves_with_path(reference)
    assert len(leaves) == len(jax.tree.leaves(ours))
    for (path, want), got in zip(leaves, jax.tree.leaves(ours), strict=True):
        assert got.dtype == jnp.float32, path
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=U_BF16, atol=0,
                                   err_msg=jax.tree_util.keystr(path))
        assert not np.array_equal(np.asarray(got), np.asarray(want)) or want.size < 16, path


def test_eos_ids_come_from_generation_config(fp32):
    _, _, _, eos_ids = hf_tiny.SPECS[fp32.arch]
    assert fp32.model.eos_ids == tuple(eos_ids)


def favour_tokens(params, ids, strength):
    """Params under which the tokens `ids` are equally likely and likely everywhere: every
    embedding gets a constant component along axis 0, which the final norm passes on with a
    positive sign, and the output columns of `ids` (made equal) read it."""
    ids = jnp.asarray(ids)
    embed = params["embed"].at[:, 0].add(strength)
    head = params["lm_head"]
    head = head.at[ids].set(head[ids[:1]]).at[ids, 0].add(strength)
    return {**params, "embed": embed, "lm_head": head}


def test_sampled_rows_stop_at_either_eos(folders):
    """Qwen3 lists two EOS ids; `generate` with eos_ids=None ends rows at both."""
    model, params, tok = load(folders["qwen3"], max_len=MAX_LEN)
    eos = model.eos_ids
    assert len(eos) == 2
    params = favour_tokens(params, eos, 4.0)
    rows = 16
    prompt = jnp.asarray([tok.encode(TEXTS[1])] * rows, jnp.int32)
    lengths = jnp.full((rows,), prompt.shape[1], jnp.int32)
    out = jax.jit(lambda p: generate(jax.random.key(1), model, p, prompt, lengths,
                                     max_new_tokens=NEW_TOKENS, temperature=1.0))(params)
    tokens, length = np.asarray(out.tokens), np.asarray(out.length)
    ended = np.asarray(out.ended_with_eos)
    last = tokens[np.arange(rows), length - 1]
    assert set(last[ended]) == set(eos)               # both ids end some row
    for row in range(rows):
        body = tokens[row, :length[row] - ended[row]]
        assert not np.isin(body, eos).any()           # no EOS before the end
        assert (tokens[row, length[row]:] == eos[0]).all()


def test_power_smc_runs(fp32):
    model, params = fp32.model, fp32.params
    row = 2
    result = jax.jit(lambda p: power_smc(
        jax.random.key(0), model, p, jnp.asarray(fp32.padded[row]),
        prompt_length=int(fp32.lengths[row]), alpha=2.0, num_particles=4, max_new_tokens=4))(
        params)
    check_smc_result(result, model.vocab_size)


def check_smc_result(result, vocab_size):
    assert not bool(result.degenerate)
    assert np.isfinite(np.asarray(result.log_weights)).all()
    assert np.isfinite(float(result.log_evidence))
    assert int(np.asarray(result.nonfinite_increments).sum()) == 0
    tokens = np.asarray(result.particles.tokens)
    assert ((tokens >= 0) & (tokens < vocab_size)).all()


def test_every_algorithm_runs_on_gemma3(folders):
    """MH power sampling, and twisted SMC with a token potential and with a regex constraint."""
    model, params, tok = load(folders["gemma3"], max_len=MAX_LEN)
    prompt = jnp.asarray(tok.encode(TEXTS[2]), jnp.int32)
    pattern = "[a-z ]+"
    regex = P.regex_constraint(pattern, P.token_bytes_of(tok))
    count = P.token_count(tok.encode(" ", add_bos=False)[0], 0.5)
    T = 6

    def run(p):
        mh = mh_power(jax.random.key(0), model, p, prompt, alpha=2.0, num_chains=2,
                      max_new_tokens=T, block_size=3, mh_steps=1)
        counted = twisted_smc(jax.random.key(1), model, p, prompt, count, num_particles=4,
                              max_new_tokens=T)
        constrained = twisted_smc(jax.random.key(2), model, p, prompt, regex, num_particles=4,
                                  max_new_tokens=T)
        return mh, counted, constrained

    mh, counted, constrained = jax.jit(run)(params)
    mh_tokens = np.asarray(mh.particles.tokens)
    assert ((mh_tokens >= 0) & (mh_tokens < model.vocab_size)).all()
    assert np.isfinite(np.asarray(mh.acceptance)).all()
    check_smc_result(counted, model.vocab_size)
    check_smc_result(constrained, model.vocab_size)
    particles = constrained.particles
    for row in range(4):
        body = np.asarray(particles.tokens[row, :int(particles.body_length[row])])
        assert re.fullmatch("[a-z ]*", tok.decode(body)), tok.decode(body)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_the_weights(folders, tmp_path):
    """A folder whose tokenizer has more tokens than the model's embedding rows does not belong
    together: `load` names the folder and both sizes before reading any weight."""
    import json
    import shutil

    folder = tmp_path / "mismatch"
    shutil.copytree(folders["llama"], folder)
    from targets.lm.tokenizer import Tokenizer
    tokens = Tokenizer.from_folder(folder).vocab_size
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = tokens - 10
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")   # never read: the check comes first
    with pytest.raises(ValueError, match=f"{re.escape(str(folder))}.*{tokens} tokens.*"
                                         f"{tokens - 10}"):
        load(folder)
