"""Tokenizer and chat template built from a GGUF file's metadata.

Byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is rebuilt with the ``tokenizers`` package from
``tokenizer.ggml.tokens`` / ``merges`` / ``token_type`` and the pre-tokenizer named by
``tokenizer.ggml.pre``; control tokens (token type 3) are registered as special tokens so that
``<|im_start|>`` in text encodes to its single id. The chat template
(``tokenizer.chat_template``) is rendered with jinja2 in a sandbox, the way transformers does
(``trim_blocks``, ``lstrip_blocks``, ``raise_exception``).

Text-level potentials see a vocabulary as ``token_bytes``, the UTF-8 bytes of every token id:
`token_bytes_of` reads them off a byte-level BPE tokenizer (GPT-2's byte-to-character table
inverted), `as_token_bytes` checks any such list (strings are UTF-8 encoded).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from smc.optional import require
from targets.lm.gguf_loader import GGUFError, metadata, open_gguf

# Pre-tokenizer regexes (as used by the reference byte-level BPE tokenizers; written out here).
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CONTROL = 3


def _pre_tokenizer(pre: str):
    Regex = require("tokenizers", "lm", "the GGUF tokenizer").Regex
    pt = require("tokenizers.pre_tokenizers", "lm", "the GGUF tokenizer")
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("gpt2", "default", ""):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        # digits split one by one, then GPT-2 byte-level pre-tokenisation
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pt.Sequence([pt.Split(Regex(_LLAMA3_PATTERN), behavior="isolated", invert=False),
                            byte_level])
    raise GGUFError(f"unsupported pre-tokenizer '{pre}' (supported: gpt2, smollm, llama-bpe)")


class GGUFTokenizer:
    """Encode/decode text and render chat prompts for a GGUF model."""

    def __init__(self, meta: dict[str, Any]):
        tokenizers = require("tokenizers", "lm", "the GGUF tokenizer")
        AddedToken, Tokenizer = tokenizers.AddedToken, tokenizers.Tokenizer
        decoders, models = tokenizers.decoders, tokenizers.models
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise GGUFError(f"unsupported tokenizer model '{kind}': only byte-level BPE ('gpt2')")
        tokens = list(meta["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                   byte_fallback=False))
        tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt2"))
        tok.decoder = decoders.ByteLevel()
        specials = [tokens[i] for i, t in enumerate(types) if t == CONTROL]
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        self._tok = tok
        self.tokens = tokens
        self.vocab_size = len(tokens)
        self.bos_id = meta.get("tokenizer.ggml.bos_token_id")
        self.eos_id = meta.get("tokenizer.ggml.eos_token_id")
        self.pad_id = meta.get("tokenizer.ggml.padding_token_id", self.eos_id)
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        self.chat_template = meta.get("tokenizer.chat_template")
        self.special_ids = {vocab[s] for s in specials}

    @classmethod
    def from_gguf(cls, path: str | os.PathLike | None = None) -> GGUFTokenizer:
        return cls(metadata(open_gguf(path)))

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.tokens[self.bos_id]

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.tokens[self.eos_id]

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The text of token ids; ValueError naming them for ids outside [0, vocab_size)."""
        ids = [int(i) for i in ids]
        bad = sorted({i for i in ids if not 0 <= i < self.vocab_size})
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True, **extra) -> str:
        if not self.chat_template:
            raise GGUFError("this GGUF has no tokenizer.chat_template")
        return render_chat_template(self.chat_template, messages,
                                    add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                    **extra)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt),
                           add_bos=False)


def render_chat_template(template: str, messages, **variables) -> str:
    TemplateError = require("jinja2.exceptions", "lm", "chat templates").TemplateError
    sandbox = require("jinja2.sandbox", "lm", "chat templates")
    ImmutableSandboxedEnvironment = sandbox.ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, **variables)


# ----------------------------------------------------------------------------- token bytes
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of each byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes_of(tokenizer) -> list[bytes]:
    """UTF-8 bytes of every token id of a byte-level BPE tokenizer (`GGUFTokenizer`).

    Control tokens (``tokenizer.special_ids``) are their literal text, as ``decode`` shows them.
    """
    inverse = _byte_decoder()
    special = set(getattr(tokenizer, "special_ids", ()))
    out = []
    for i, token in enumerate(tokenizer.tokens):
        if i in special or any(c not in inverse for c in token):
            out.append(token.encode("utf-8"))
        else:
            out.append(bytes(inverse[c] for c in token))
    return out


def as_token_bytes(token_bytes: Sequence[bytes | str]) -> list[bytes]:
    """A vocabulary as ``list[bytes]``, one entry per token id (a str is UTF-8 encoded); raises
    on an empty vocabulary, a bare str/bytes, or an entry that is neither bytes nor str."""
    if isinstance(token_bytes, (str, bytes)) or len(token_bytes) == 0:
        raise ValueError("token_bytes must be a non-empty sequence with one entry per token id")
    out = []
    for i, b in enumerate(token_bytes):
        if isinstance(b, str):
            b = b.encode("utf-8")
        if not isinstance(b, bytes):
            raise TypeError(f"token_bytes[{i}] must be bytes or str, got {type(b).__name__}")
        out.append(b)
    return out
