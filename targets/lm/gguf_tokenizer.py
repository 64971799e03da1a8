"""A ``tokenizers.Tokenizer`` rebuilt from the tokenizer metadata of a GGUF file.

A GGUF file has no ``tokenizer.json``: llama.cpp's converter stores the vocabulary as metadata
(``tokenizer.ggml.tokens``, ``token_type``, ``scores``, ``merges``, the special token ids). Two
kinds are rebuilt here, named by ``tokenizer.ggml.model``:

``gpt2``: byte-level BPE (SmolLM2, Llama 3, Qwen). The merges are stored; the pre-tokenizer regex
is the one named by ``tokenizer.ggml.pre``.

``llama``: SentencePiece BPE with byte fallback (Llama 2, Gemma 3). Spaces are written ``▁``
(U+2581), a character missing from the vocabulary falls back to its UTF-8 bytes ``<0xNN>``, and
``add_space_prefix`` says whether a ``▁`` is put before the text. No merges are stored, so they
are derived: SentencePiece's BPE trainer writes the pieces in the order it learnt them (their
scores are minus that order), so a piece's merge rank is its position, and every way of cutting a
piece into two pieces of the vocabulary is a merge with that rank (longer left part first, as
transformers orders them; no text was found where that order matters). That is one pass over
the vocabulary, a few string slices per character: about two seconds for Gemma 3's 262,144
pieces. The position, not the score, is the rank because llama.cpp gives user-defined pieces a
placeholder score (-1000). llama.cpp's converter also writes Gemma's user-defined whitespace
pieces with real spaces (``"  "``) where SentencePiece writes ``"▁▁"``; they are spelt back, so
that runs of spaces merge as they do in transformers.

In both kinds control tokens (``<bos>``, ``<|im_start|>``, token type 3) become special added
tokens, so that their text in a prompt encodes to their single id, and user-defined tokens
(``<think>``, ``"\\n\\n"``, type 4) plain added tokens, matched whole in the text. BOS (and EOS)
are added by the post-processor when ``tokenizer.ggml.add_bos_token`` (``add_eos_token``) says so.
"""
from __future__ import annotations

import functools
from typing import Any

from smc.optional import require
from targets.lm.gguf_loader import GGUFError, metadata

# llama.cpp's token types (llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's stand-in for a space

# Pre-tokenizer regexes (as used by the reference byte-level BPE tokenizers; written out here).
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _tokenizers():
    return require("tokenizers", "lm", "the GGUF tokenizer")


@functools.lru_cache(maxsize=4)
def gguf_backend(reader):
    """The ``tokenizers.Tokenizer`` of an open GGUF file (`gguf_loader.open_gguf`), built once per
    file: deriving a SentencePiece vocabulary's merges takes seconds. Shared: do not modify it."""
    return build_backend(metadata(reader))


def build_backend(meta: dict[str, Any]):
    """A ``tokenizers.Tokenizer`` equivalent to the one the GGUF metadata ``meta`` describes."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        backend = _byte_level_bpe(meta)
    elif kind == "llama":
        backend = _sentencepiece_bpe(meta)
    else:
        raise GGUFError(f"unsupported tokenizer model '{kind}' (supported: 'gpt2' byte-level BPE, "
                        "'llama' SentencePiece BPE)")
    _add_special_tokens(backend, meta)
    tokens = meta["tokenizer.ggml.tokens"]

    def named(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else (tokens[int(i)], int(i))

    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's defaults
    backend.post_processor = framing(named("bos") if add_bos else None,
                                     named("eos") if meta.get("tokenizer.ggml.add_eos_token")
                                     else None)
    return backend


def framing(bos: tuple[str, int] | None, eos: tuple[str, int] | None):
    """A post-processor that puts the ``(token, id)`` ``bos`` before and ``eos`` after the text
    (either may be None), as transformers builds it from ``add_bos_token`` / ``add_eos_token``."""
    processors = require("tokenizers.processors", "lm", "the tokenizer")
    single = ([bos[0]] if bos else []) + ["$A"] + ([eos[0]] if eos else [])
    return processors.TemplateProcessing(single=single,
                                         special_tokens=[e for e in (bos, eos) if e])


def _byte_level_pre_tokenizer(pre: str):
    tokenizers = _tokenizers()
    pt = tokenizers.pre_tokenizers
    if pre in ("gpt2", "default", ""):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        # digits split one by one, then GPT-2 byte-level pre-tokenisation
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pt.Sequence([pt.Split(tokenizers.Regex(_LLAMA3_PATTERN), behavior="isolated",
                                     invert=False),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise GGUFError(f"unsupported pre-tokenizer '{pre}' (supported: gpt2, smollm, llama-bpe)")


def _byte_level_bpe(meta):
    tokenizers = _tokenizers()
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
        byte_fallback=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt2"))
    backend.decoder = tokenizers.decoders.ByteLevel()
    return backend


def _sentencepiece_pieces(meta) -> list[str]:
    """The pieces as SentencePiece spells them: user-defined ones with ``▁`` for a space."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = _types(meta)
    return [t.replace(" ", SPACE) if kind == USER_DEFINED and " " in t else t
            for t, kind in zip(tokens, types)]


def sentencepiece_merges(pieces: list[str], types: list[int]) -> list[tuple[str, str]]:
    """The BPE merges of a SentencePiece BPE vocabulary, best first (see the module docstring):
    for each normal or user-defined piece in vocabulary order, every cut into two pieces that are
    in the vocabulary, longer left part first."""
    vocab = set(pieces)
    merges = []
    append = merges.append
    for piece, kind in zip(pieces, types):
        if kind != NORMAL and kind != USER_DEFINED:
            continue
        for cut in range(len(piece) - 1, 0, -1):
            left = piece[:cut]
            if left in vocab:
                right = piece[cut:]
                if right in vocab:
                    append((left, right))
    return merges


def _sentencepiece_bpe(meta):
    tokenizers = _tokenizers()
    pieces = _sentencepiece_pieces(meta)
    types = _types(meta)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={p: i for i, p in enumerate(pieces)}, merges=sentencepiece_merges(pieces, types),
        unk_token=None if unk_id is None else pieces[unk_id], fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="first" if prefix else "never", split=False)
    decoders = tokenizers.decoders
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:  # the space put before the text is not part of it
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _types(meta) -> list[int]:
    tokens = meta["tokenizer.ggml.tokens"]
    types = list(meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
    if len(types) != len(tokens):
        raise GGUFError(f"tokenizer.ggml.token_type has {len(types)} entries for "
                        f"{len(tokens)} tokens")
    return types


def _add_special_tokens(backend, meta) -> None:
    """Control tokens as special added tokens, user-defined ones as plain added tokens (those
    spelt with spaces excepted: a SentencePiece vocabulary reaches them by merging ``▁``)."""
    AddedToken = _tokenizers().AddedToken
    tokens, types = meta["tokenizer.ggml.tokens"], _types(meta)
    sentencepiece = meta.get("tokenizer.ggml.model") == "llama"
    control = [t for t, kind in zip(tokens, types) if kind == CONTROL]
    user = [t for t, kind in zip(tokens, types)
            if kind == USER_DEFINED and not (sentencepiece and " " in t)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
