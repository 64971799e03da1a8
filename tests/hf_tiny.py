"""Tiny random Hugging Face model folders of every architecture we load, built locally.

`build_tiny(arch, folder)` writes what a user brings from the hub (``config.json``,
``model.safetensors``, ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``
and the chat template), made by the installed transformers itself from a config: no download.
(transformers 5 writes RoPE as ``rope_parameters`` and the template as ``chat_template.jinja``;
folders saved by 4.x have ``rope_theta`` / ``rope_scaling`` and the template inside
``tokenizer_config.json``.) The sizes are small and odd (2-3 layers, grouped KV heads, explicit
head_dim where the architecture has one) and every option an architecture has is switched on
with a value that matters at test lengths (a sliding window shorter than the prompts, Llama 3
RoPE scaling with a short original context, Gemma's final-logit soft cap and
``query_pre_attn_scalar``). Gemma's ``attn_logit_softcapping`` stays unset: transformers'
Gemma 3 ignores it (only Gemma 2 applies it), as real Gemma 3 configs (null) do.

The weights are redrawn so that a mistake shows: matrices with variance 1/fan_in (attention
logits and activations of order one, logits with a spread of a few units), and the norm weights
and biases that transformers initialises to constants (1 or 0) perturbed, so that a forgotten
bias or a ``x * w`` for Gemma's ``x * (1 + w)`` changes the logits by order one.
"""
from __future__ import annotations

from pathlib import Path

ARCHS = ("llama", "llama3_untied", "mistral", "qwen2", "qwen3", "gemma3")

SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<bos>", "<|im_start|>", "<|im_end|>"]
PAD, ENDOFTEXT, BOS, IM_START, IM_END = range(len(SPECIAL_TOKENS))
TOKENIZER_VOCAB = 300  # 256 bytes, the special tokens and a few dozen merges

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Sequential Monte Carlo samplers weight, resample and move particles.",
    "A language model assigns a probability to every continuation of a prompt.",
    "She sells sea shells by the sea shore; the shells she sells are sea shells.",
    "def f(x):\n    return x * x + 1\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1234.",
]

# Per architecture: the config class, its keyword arguments, whether the tokenizer adds a BOS,
# and the EOS ids of generation_config.json (Qwen's instruct models list two).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
SPECS = {
    "llama": ("LlamaConfig", {
        "vocab_size": 384, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "attention_bias": True, "rms_norm_eps": 1e-5}, True, [ENDOFTEXT]),
    "llama3_untied": ("LlamaConfig", {
        "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
        "rope_parameters": LLAMA3_ROPE, "rms_norm_eps": 1e-5}, True, [ENDOFTEXT]),
    "mistral": ("MistralConfig", {
        "vocab_size": 352, "hidden_size": 48, "intermediate_size": 72, "num_hidden_layers": 3,
        "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 8, "sliding_window": 7,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-5}, True, [ENDOFTEXT]),
    "qwen2": ("Qwen2Config", {
        "vocab_size": 416, "hidden_size": 72, "intermediate_size": 112, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "use_sliding_window": False, "rms_norm_eps": 1e-6}, False, [IM_END, ENDOFTEXT]),
    "qwen3": ("Qwen3Config", {
        "vocab_size": 448, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
        "tie_word_embeddings": False, "use_sliding_window": False, "rms_norm_eps": 1e-6},
        False, [IM_END, ENDOFTEXT]),
    "gemma3": ("Gemma3TextConfig", {
        "vocab_size": 512, "hidden_size": 80, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 24,
        "query_pre_attn_scalar": 32, "sliding_window": 6,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        "final_logit_softcapping": 15.0, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6}, True, [ENDOFTEXT, IM_END]),
}
MAX_POSITIONS = 256
EMBED_STD = 0.5       # tied logits = normed x . embed: spread ~ EMBED_STD * sqrt(D), a few units
LM_HEAD_GAIN = 4.0    # untied lm_head rows of norm ~ LM_HEAD_GAIN: the same spread
NORM_JITTER = 0.1     # norm weights w0 + 0.1 N(0, 1)
BIAS_STD = 0.2


# Qwen's split (digits one by one), which transformers' Qwen2Tokenizer imposes whatever
# tokenizer.json says: the Qwen folders carry it so that both readings agree, as on the hub
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
              r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def build_tokenizer(qwen: bool = False):
    """A byte-level BPE trained on `TRAINING_TEXT` with the special tokens at ids 0..4; with
    ``qwen``, Qwen's NFC normaliser and pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if qwen:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    return tok


def wrap_tokenizer(tok, add_bos: bool, eos_id: int):
    """The BPE as a transformers fast tokenizer: special tokens, BOS prepended or not, template."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>" if add_bos else None,
        eos_token=SPECIAL_TOKENS[eos_id], pad_token="<pad>", chat_template=CHAT_TEMPLATE,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def redraw_weights(model, seed: int):
    """Weights that make mistakes visible (module docstring); in place, deterministic."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    normal = lambda p: torch.randn(p.shape, generator=gen, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:                      # RMSNorm weights (1, or 0 for Gemma's 1 + w)
                p.add_(NORM_JITTER * normal(p))
            elif name.endswith(".bias"):
                p.copy_(BIAS_STD * normal(p))
            elif "embed_tokens" in name:
                p.copy_(EMBED_STD * normal(p))
            elif name == "lm_head.weight":
                p.copy_(LM_HEAD_GAIN * normal(p) / p.shape[1] ** 0.5)
            else:                                   # Linear [out, in]
                p.copy_(normal(p) / p.shape[1] ** 0.5)


def build_tiny(arch: str, folder, dtype: str = "float32", seed: int = 0,
               kv_heads: int | None = None) -> Path:
    """Write a tiny random `arch` model folder (one of `ARCHS`) with weights stored in `dtype`
    ("float32" or "bfloat16"); returns the folder. `kv_heads`: that many KV heads instead of
    the spec's, each with the spec's number of query heads (e.g. for a split over devices);
    an architecture without an explicit head_dim then has smaller heads."""
    import torch
    import transformers

    if arch not in SPECS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    config_class, options, add_bos, eos_ids = SPECS[arch]
    if kv_heads is not None:
        group = options["num_attention_heads"] // options["num_key_value_heads"]
        options = dict(options, num_key_value_heads=kv_heads, num_attention_heads=kv_heads * group)
    folder = Path(folder)
    config = getattr(transformers, config_class)(
        **options, max_position_embeddings=MAX_POSITIONS, pad_token_id=PAD,
        bos_token_id=BOS if add_bos else None, eos_token_id=eos_ids[0])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    redraw_weights(model, seed)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=list(eos_ids), pad_token_id=PAD)
    model.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
    tokenizer = build_tokenizer(qwen=arch.startswith("qwen"))
    wrap_tokenizer(tokenizer, add_bos, eos_ids[0]).save_pretrained(folder)
    return folder
