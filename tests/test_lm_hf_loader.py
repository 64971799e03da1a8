"""targets.lm.hf_loader: Hugging Face folders -> TransformerConfig and weights.

Most tests build tiny folders by hand (a config dict and safetensors.numpy); one test per
architecture checks against models that transformers builds from a config and saves (skipped
without torch/transformers).
"""
from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")

from targets.lm.config import Rope
from targets.lm.hf_loader import (
    CheckpointError,
    read_config,
    read_generation_eos,
    read_weights,
)

LLAMA = {"model_type": "llama", "vocab_size": 37, "hidden_size": 24, "intermediate_size": 40,
         "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
         "rms_norm_eps": 1e-5, "max_position_embeddings": 64, "tie_word_embeddings": False,
         "rope_theta": 5000.0}


def llama_tensors(config: dict, dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors with the names and [out, in] shapes of a llama checkpoint."""
    rng = np.random.default_rng(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
              "lm_head.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def write_folder(path, config: dict, tensors: dict, shards: int = 1):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if shards == 1:
        safetensors_numpy.save_file(tensors, str(path / "model.safetensors"))
        return path
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        safetensors_numpy.save_file(part, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("llama"), LLAMA, llama_tensors(LLAMA))


@pytest.fixture
def copy(llama_folder, tmp_path):
    """A fresh copy of the hand-built llama folder, for tests that break it."""
    return shutil.copytree(llama_folder, tmp_path / "model")


def rewrite_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is DELETE]:
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))


DELETE = object()


# ------------------------------------------------------------------------------- layout


def test_hand_built_llama_layout(llama_folder):
    config = read_config(llama_folder)
    assert (config.architecture, config.dim, config.n_layers, config.n_heads, config.n_kv_heads,
            config.head_dim, config.ffn_dim, config.vocab_size, config.context_length) == (
        "llama", 24, 2, 6, 2, 4, 40, 37, 64)
    assert config.norm_eps == 1e-5 and config.rope == Rope(base=5000.0)
    assert not (config.tie_embeddings or config.qkv_bias or config.out_bias or config.qk_norm)
    weights = read_weights(llama_folder, config)
    t = llama_tensors(LLAMA)
    np.testing.assert_array_equal(weights["embed"], t["model.embed_tokens.weight"])
    np.testing.assert_array_equal(weights["lm_head"], t["lm_head.weight"].T)
    np.testing.assert_array_equal(weights["final_norm"], t["model.norm.weight"])
    layers = weights["layers"]
    assert set(layers) == {"attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up",
                           "w_down"}
    for i in range(2):
        p = f"model.layers.{i}."
        np.testing.assert_array_equal(layers["wq"][i], t[p + "self_attn.q_proj.weight"].T)
        np.testing.assert_array_equal(layers["wk"][i], t[p + "self_attn.k_proj.weight"].T)
        np.testing.assert_array_equal(layers["wo"][i], t[p + "self_attn.o_proj.weight"].T)
        np.testing.assert_array_equal(layers["w_down"][i], t[p + "mlp.down_proj.weight"].T)
        np.testing.assert_array_equal(layers["attn_norm"][i], t[p + "input_layernorm.weight"])
        np.testing.assert_array_equal(layers["ffn_norm"][i],
                                      t[p + "post_attention_layernorm.weight"])
    assert layers["wq"].shape == (2, 24, 24) and layers["w_down"].shape == (2, 40, 24)
    assert all(a.flags.c_contiguous for a in layers.values())


def test_bfloat16_and_float16_are_kept(tmp_path):
    """No upcast: a bf16 checkpoint stays bf16 (values bit-exact), an f16 one f16."""
    for dtype in (ml_dtypes.bfloat16, np.float16):
        tensors = llama_tensors(LLAMA, dtype)
        folder = write_folder(tmp_path / np.dtype(dtype).name, LLAMA, tensors)
        weights = read_weights(folder, read_config(folder))
        assert weights["embed"].dtype == dtype and weights["layers"]["wq"].dtype == dtype
        np.testing.assert_array_equal(weights["layers"]["wv"][1].view(np.uint16),
                                      tensors["model.layers.1.self_attn.v_proj.weight"].T
                                      .view(np.uint16))


def test_shards_read_as_one(llama_folder, tmp_path):
    folder = write_folder(tmp_path / "sharded", LLAMA, llama_tensors(LLAMA), shards=3)
    assert not (folder / "model.safetensors").exists()
    config = read_config(folder)
    sharded, single = read_weights(folder, config), read_weights(llama_folder, config)
    for name in ("embed", "lm_head", "final_norm"):
        np.testing.assert_array_equal(sharded[name], single[name])
    for name, array in single["layers"].items():
        np.testing.assert_array_equal(sharded["layers"][name], array)


def test_tied_lm_head_and_rope_buffers_are_ignored(tmp_path):
    """transformers ignores a stored lm_head when tied, and old rotary_emb.inv_freq buffers."""
    config = dict(LLAMA, tie_word_embeddings=True)
    tensors = llama_tensors(config)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    folder = write_folder(tmp_path / "tied", config, tensors)
    weights = read_weights(folder, read_config(folder))
    assert "lm_head" not in weights
    del tensors["lm_head.weight"]
    folder = write_folder(tmp_path / "tied_no_head", config, tensors)
    assert "lm_head" not in read_weights(folder, read_config(folder))


# ------------------------------------------------------------------------------- config


def config_of(tmp_path, **changes):
    folder = tmp_path / "cfg"
    folder.mkdir(exist_ok=True)
    config = dict(LLAMA, **changes)
    for key in [k for k, v in changes.items() if v is DELETE]:
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    return read_config(folder)


def test_rope_old_and_new_formats(tmp_path):
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32}
    expected = Rope(base=5e5, scaling="llama3", factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_context=32)
    old = config_of(tmp_path, rope_theta=5e5, rope_scaling=dict(llama3, rope_type="llama3"))
    new = config_of(tmp_path, rope_theta=DELETE,
                    rope_parameters=dict(llama3, rope_type="llama3", rope_theta=5e5))
    assert old.rope == new.rope == expected
    both = config_of(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0},
                     rope_parameters={"rope_type": "default", "rope_theta": 7.0})
    assert both.rope == Rope(base=5000.0, scaling="linear", factor=2.0)  # as transformers picks
    # "type" is the older spelling of "rope_type"; the default original context is the model's
    linear = config_of(tmp_path, rope_scaling={"type": "linear", "factor": 2.0})
    assert linear.rope == Rope(base=5000.0, scaling="linear", factor=2.0)
    no_original = dict(llama3, rope_type="llama3")
    del no_original["original_max_position_embeddings"]
    assert config_of(tmp_path, rope_scaling=no_original).rope.original_context == 64
    assert config_of(tmp_path, rope_theta=DELETE).rope.base == 10000.0


def test_architecture_defaults_and_options(tmp_path):
    base = {"hidden_size": 24, "num_attention_heads": 6, "num_key_value_heads": 2}
    qwen2 = config_of(tmp_path, model_type="qwen2", tie_word_embeddings=DELETE,
                      sliding_window=8, use_sliding_window=False, **base)
    assert qwen2.qkv_bias and not qwen2.out_bias and not qwen2.tie_embeddings
    assert qwen2.sliding_window is None  # ignored without use_sliding_window, as transformers does
    qwen3 = config_of(tmp_path, model_type="qwen3", head_dim=DELETE, attention_bias=True)
    assert qwen3.head_dim == 128 and qwen3.qk_norm and qwen3.qkv_bias and qwen3.out_bias
    llama = config_of(tmp_path, attention_bias=True, head_dim=6, hidden_act="swish")
    assert llama.qkv_bias and llama.out_bias and llama.head_dim == 6 and llama.activation == "silu"
    assert config_of(tmp_path, num_key_value_heads=DELETE).n_kv_heads == 6
    mistral = config_of(tmp_path, model_type="mistral", sliding_window=7)
    assert mistral.sliding_window == 7 and mistral.sliding_layers == (True, True)
    assert not mistral.qkv_bias and not mistral.out_bias
    assert config_of(tmp_path, model_type="mistral").sliding_window == 4096  # transformers'
    assert config_of(tmp_path, model_type="mistral", sliding_window=None).sliding_window is None
    assert config_of(tmp_path, hidden_act="gelu_new").activation == "gelu_tanh"


def test_gemma3_old_and_new_formats(tmp_path):
    gemma = {"model_type": "gemma3_text", "num_hidden_layers": 7, "head_dim": 8,
             "tie_word_embeddings": DELETE, "rope_theta": DELETE, "sliding_window": 3,
             "query_pre_attn_scalar": 16, "final_logit_softcapping": 30.0,
             "attn_logit_softcapping": None}
    old = config_of(tmp_path, **gemma, sliding_window_pattern=3, rope_local_base_freq=100.0,
                    rope_scaling={"rope_type": "linear", "factor": 8.0})
    assert old.architecture == "gemma3" and old.sliding_layers == (
        True, True, False, True, True, False, True)
    assert old.rope == Rope(base=1e6, scaling="linear", factor=8.0)   # rope_scaling: global only
    assert old.rope_local == Rope(base=100.0)
    assert old.tie_embeddings and old.qk_norm and old.sandwich_norm
    assert old.activation == "gelu_tanh" and old.embed_scale == pytest.approx(24 ** 0.5)
    assert old.attn_scale == 0.25 and old.sliding_window == 3
    assert old.final_logit_softcap == 30.0 and old.attn_logit_softcap is None
    assert config_of(tmp_path, **gemma).sliding_layers == (True,) * 5 + (False, True)  # every 6th
    types = ["full_attention", "sliding_attention"] * 3 + ["full_attention"]
    new = config_of(tmp_path, **gemma, layer_types=types, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 2e5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})
    assert new.sliding_layers == tuple(t == "sliding_attention" for t in types)
    assert new.rope == Rope(base=2e5) and new.rope_local == Rope(base=50.0)


BAD_CONFIGS = [
    ({"model_type": "gpt2"}, ["'gpt2'", "llama, mistral, qwen2, qwen3, gemma3_text"]),
    ({"model_type": "gemma3"}, ["multimodal", "gemma3_text"]),
    ({"model_type": DELETE}, ["missing field 'model_type'"]),
    ({"hidden_size": DELETE}, ["missing field 'hidden_size'"]),
    ({"hidden_size": "24"}, ["'hidden_size' must be an int"]),
    ({"num_key_value_heads": 4}, ["not a multiple"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["'yarn'", "default, linear"]),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, ["'dynamic'"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["'low_freq_factor'"]),
    ({"partial_rotary_factor": 0.5}, ["partial_rotary_factor"]),
    ({"hidden_act": "relu"}, ["hidden_act 'relu'"]),
    ({"mlp_bias": True}, ["mlp_bias"]),
    ({"quantization_config": {"quant_method": "gptq"}}, ["quantization_config"]),
    ({"model_type": "mistral", "attention_bias": True}, ["attention_bias", "mistral"]),
    ({"model_type": "qwen2", "use_sliding_window": True}, ["use_sliding_window"]),
    ({"model_type": "qwen3", "layer_types": ["full_attention", "sliding_attention"]},
     ["layer_types"]),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True},
     ["use_bidirectional_attention"]),
    ({"model_type": "gemma3_text", "layer_types": ["full_attention"]}, ["layer_types"]),
    ({"model_type": "gemma3_text", "attn_logit_softcapping": 50.0}, ["attn_logit_softcapping"]),
    ({"model_type": "gemma3_text", "rope_parameters": {"rope_type": "default"}},
     ["per layer type"]),
]


@pytest.mark.parametrize("changes,phrases", BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))])
def test_bad_config_is_named(tmp_path, changes, phrases):
    with pytest.raises(CheckpointError) as info:
        config_of(tmp_path, **changes)
    message = str(info.value)
    assert "config.json" in message
    for phrase in phrases:
        assert phrase in message


# ------------------------------------------------------------------------------- bad folders


def raises_naming(folder, *phrases, weights=True):
    with pytest.raises(CheckpointError) as info:
        config = read_config(folder)
        if weights:
            read_weights(folder, config)
    for phrase in phrases:
        assert phrase in str(info.value)
    return str(info.value)


def test_missing_folder_and_config(tmp_path, copy):
    raises_naming(tmp_path / "nowhere", "model folder not found", str(tmp_path / "nowhere"))
    (copy / "config.json").write_text("{not json")
    raises_naming(copy, "config.json", "not a readable JSON file")
    (copy / "config.json").unlink()
    raises_naming(copy, "config.json", "file not found")


def test_no_safetensors(copy):
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    raises_naming(copy, "pytorch_model.bin", "safetensors")


def test_missing_and_truncated_shard(tmp_path):
    folder = write_folder(tmp_path / "sharded", LLAMA, llama_tensors(LLAMA), shards=2)
    shard = folder / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    raises_naming(folder, str(shard), "truncated", f"file has {len(data) - 10}")
    shard.unlink()
    raises_naming(folder, "model.safetensors.index.json", "model-00002-of-00002.safetensors",
                  "missing")


def test_truncated_single_file(copy):
    path = copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    raises_naming(copy, str(path), "truncated")


def test_missing_tensor(copy):
    tensors = llama_tensors(LLAMA)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_folder(copy, LLAMA, tensors)
    raises_naming(copy, "model.safetensors", "'model.layers.1.mlp.up_proj.weight' is missing")
    tensors = llama_tensors(LLAMA)   # LLAMA is untied, so it needs lm_head
    del tensors["lm_head.weight"]
    write_folder(copy, LLAMA, tensors)
    raises_naming(copy, "'lm_head.weight' is missing")


def test_wrong_shape(copy):
    tensors = llama_tensors(LLAMA)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((12, 24), np.float32)
    write_folder(copy, LLAMA, tensors)
    raises_naming(copy, "model.safetensors", "'model.layers.0.self_attn.k_proj.weight'",
                  "shape [12, 24]", "expected [8, 24]")


def write_raw_safetensors(path, tensors: dict[str, tuple[str, tuple, bytes]]):
    """A safetensors file written byte by byte, for dtypes numpy cannot save (float8)."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def test_unsupported_dtypes(copy):
    tensors = llama_tensors(LLAMA)
    tensors["model.layers.0.mlp.gate_proj.weight"] = np.zeros((40, 24), np.int8)
    write_folder(copy, LLAMA, tensors)
    raises_naming(copy, "model.safetensors", "'model.layers.0.mlp.gate_proj.weight'",
                  "dtype I8", "not supported")
    raw = {n: ("F32", a.shape, a.astype(np.float32).tobytes()) for n, a in tensors.items()}
    raw["model.norm.weight"] = ("F8_E4M3", (24,), bytes(24))
    write_raw_safetensors(copy / "model.safetensors", raw)
    raises_naming(copy, "'model.norm.weight'", "dtype F8_E4M3")


def test_unexpected_tensors_are_errors(copy):
    tensors = llama_tensors(LLAMA)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(24, np.float32)  # attention_bias off
    write_folder(copy, LLAMA, tensors)
    raises_naming(copy, "model.safetensors", "'model.layers.0.self_attn.q_proj.bias'")
    tensors = {"language_model." + k: v for k, v in llama_tensors(LLAMA).items()}
    write_folder(copy, LLAMA, tensors)
    raises_naming(copy, "Gemma3ForConditionalGeneration", "text model")


def test_generation_eos(copy):
    assert read_generation_eos(copy) == ()
    rewrite_config(copy, eos_token_id=2)
    assert read_generation_eos(copy) == (2,)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 3, 7]}))
    assert read_generation_eos(copy) == (7, 3)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    assert read_generation_eos(copy) == (2,)   # falls back on config.json
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": ["x"]}))
    with pytest.raises(CheckpointError, match="generation_config.json"):
        read_generation_eos(copy)
    (copy / "generation_config.json").write_text("[")
    with pytest.raises(CheckpointError, match="generation_config.json"):
        read_generation_eos(copy)


# ------------------------------------------------------------------------------- transformers

SIZES = {"vocab_size": 53, "hidden_size": 48, "intermediate_size": 68, "num_hidden_layers": 2,
         "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 128}
ARCHITECTURES = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": False, "rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}),
    "mistral": ("MistralConfig", {"sliding_window": 5}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 10}),
    "gemma3_text": ("Gemma3TextConfig", {
        "head_dim": 10, "sliding_window": 4, "query_pre_attn_scalar": 12,
        "final_logit_softcapping": 30.0,
        "layer_types": ["sliding_attention", "full_attention"]}),
}
# checkpoint name (per layer after "model.layers.{i}.") -> ours; gemma renames the two middle norms
HF_NAMES = {"self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk",
            "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
            "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk",
            "self_attn.v_proj.bias": "bv", "self_attn.q_norm.weight": "q_norm",
            "self_attn.k_norm.weight": "k_norm", "input_layernorm.weight": "attn_norm",
            "post_attention_layernorm.weight": "ffn_norm", "mlp.gate_proj.weight": "w_gate",
            "mlp.up_proj.weight": "w_up", "mlp.down_proj.weight": "w_down"}
GEMMA_NAMES = {"post_attention_layernorm.weight": "post_attn_norm",
               "pre_feedforward_layernorm.weight": "ffn_norm",
               "post_feedforward_layernorm.weight": "post_ffn_norm"}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Each architecture built by transformers with random weights (norms included, so that a
    swapped norm would show), saved as safetensors: name -> (folder, model)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = {}
    for name, (config_class, extra) in ARCHITECTURES.items():
        config = getattr(transformers, config_class)(**SIZES, **extra)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_()
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        out[name] = (folder, model)
    return out


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_matches_transformers(saved_models, name):
    folder, model = saved_models[name]
    config = read_config(folder)
    weights = read_weights(folder, config)
    gemma = name == "gemma3_text"
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    seen = set()
    for key, value in state.items():
        if key == "lm_head.weight":
            if config.tie_embeddings:
                continue
            ours, layer, value = "lm_head", None, value.T
        elif key == "model.embed_tokens.weight":
            ours, layer = "embed", None
        elif key == "model.norm.weight":
            ours, layer = "final_norm", None
        else:
            _, _, index, rest = key.split(".", 3)
            ours, layer = (dict(HF_NAMES, **GEMMA_NAMES) if gemma else HF_NAMES)[rest], int(index)
            value = value.T
        if gemma and ours.endswith("norm"):
            value = value.astype(np.float32) + 1
        got = weights[ours] if layer is None else weights["layers"][ours][layer]
        np.testing.assert_array_equal(got, value, err_msg=key)
        seen.add(ours)
    assert seen == set(weights) - {"layers"} | set(weights["layers"])
    # the config means what transformers' model does
    hf = model.config
    attention = model.model.layers[0].self_attn
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim,
            config.ffn_dim, config.vocab_size, config.norm_eps, config.context_length) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
        attention.head_dim, hf.intermediate_size, hf.vocab_size, hf.rms_norm_eps,
        hf.max_position_embeddings)
    assert config.tie_embeddings == (model.lm_head.weight is model.model.embed_tokens.weight)
    assert config.query_scale == pytest.approx(attention.scaling)
    rotary = model.model.rotary_emb
    for layer in range(config.n_layers):
        kind = hf.layer_types[layer] if gemma else None
        inv_freq = getattr(rotary, f"{kind}_inv_freq") if gemma else rotary.inv_freq
        np.testing.assert_allclose(config.rope_of(layer).inverse_frequencies(config.head_dim),
                                   inv_freq.numpy(), rtol=1e-6)
        window = getattr(model.model.layers[layer].self_attn, "sliding_window", None)
        if name == "mistral":
            window = hf.sliding_window
        assert config.window(layer) == window
    if gemma:
        assert config.embed_scale == pytest.approx(float(model.model.embed_tokens.embed_scale))
        assert (config.attn_logit_softcap, config.final_logit_softcap) == (None, 30.0)
