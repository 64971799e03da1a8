"""One tokenizer for GGUF files and Hugging Face folders, and the chat template.

`Tokenizer` wraps a ``tokenizers.Tokenizer`` (its `backend`) with what a language model needs
around it: the BOS, EOS and padding ids, whether encoding adds BOS, and the chat template. It
is built from either source the models load from:

- `Tokenizer.from_gguf(path)`: the backend is rebuilt from the file's metadata
  (`targets.lm.gguf_tokenizer`: byte-level BPE or SentencePiece BPE); EOS ids are the file's
  ``eos``, ``eot`` (end of turn) and ``eom`` (end of message) token ids.
- `Tokenizer.from_folder(folder)`: ``tokenizer.json`` is the backend, and its post-processor
  adds BOS/EOS (``add_bos_token`` / ``add_eos_token`` of ``tokenizer_config.json`` do when it has
  none); ``tokenizer_config.json`` (or ``special_tokens_map.json``) names the special tokens and
  holds the chat template (``chat_template.jinja`` comes first); ``generation_config.json`` lists
  the EOS ids (the tokenizer's EOS token when it does not). Encoding equals transformers 5's
  ``AutoTokenizer.from_pretrained(folder)(text)["input_ids"]``, which reads the flags only from
  the configuration of the tokenizer classes it rebuilds (transformers 4 did the same for its
  SentencePiece classes; version 5 adds nothing when tokenizer.json has no post-processor).

The chat template is rendered with jinja2 in a sandbox the way transformers does (``trim_blocks``,
``lstrip_blocks``, loop controls, ``raise_exception``, ``tojson`` without ASCII escapes,
``strftime_now``, and ``{% generation %}`` blocks rendered as their content).

Text-level potentials see a vocabulary as ``token_bytes``, the UTF-8 bytes of every token id:
`token_bytes_of` reads them off a tokenizer by the kind of its decoder (byte-level BPE, or
SentencePiece's ``▁`` and ``<0xNN>`` byte pieces); `as_token_bytes` checks any such list
(strings are UTF-8 encoded).
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from smc.optional import require
from smc.validation import static_bool
from targets.lm.gguf_loader import default_gguf_path, metadata, open_gguf
from targets.lm.gguf_tokenizer import framing, gguf_backend


class TokenizerError(ValueError):
    """A tokenizer file that is missing or malformed, or a chat template that cannot render."""


class Tokenizer:
    """Encode/decode text and render chat prompts; build one with `from_gguf` or `from_folder`.

    Attributes: ``backend`` (the ``tokenizers.Tokenizer``; shared between tokenizers of the same
    GGUF file, so do not modify it), ``tokens`` (the token strings by id, as the source stores
    them), ``vocab_size``, ``bos_id``, ``eos_ids`` (every id that ends a turn), ``eos_id`` (the
    first of them, or None), ``pad_id`` (the padding token, or ``eos_id`` when there is none),
    ``add_bos`` (whether `encode` adds BOS by default), ``special_ids`` (the ids of special
    tokens, which ``decode(..., skip_special=True)`` drops), ``chat_template`` (None if none)
    and ``source`` (the file or folder it was read from).
    """

    def __init__(self, backend, *, tokens: Sequence[str], bos_id: int | None,
                 eos_ids: Sequence[int], pad_id: int | None, chat_template: str | None,
                 source: str, template_source: str | None = None):
        self.backend = backend
        self.tokens = list(tokens)
        self.vocab_size = len(self.tokens)
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.eos_id = self.eos_ids[0] if self.eos_ids else None
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self.chat_template = chat_template or None
        self.source = source
        self.template_source = template_source or source
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items()
                                     if t.special)
        framed = backend.encode("", add_special_tokens=True).ids
        self.add_bos = self.bos_id is not None and framed[:1] == [self.bos_id]

    # ------------------------------------------------------------------------- constructors
    @classmethod
    def from_gguf(cls, path: str | os.PathLike | None = None) -> Tokenizer:
        """The tokenizer of a GGUF file (default: the shipped SmolLM2). Rebuilding a large
        SentencePiece vocabulary takes seconds, so it is done once per file."""
        reader = open_gguf(path)
        meta = metadata(reader)
        tokens = meta["tokenizer.ggml.tokens"]
        eos_ids = [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot", "eom")
                   if meta.get(f"tokenizer.ggml.{k}_token_id") is not None]
        source = str(default_gguf_path() if path is None else path)
        return cls(gguf_backend(reader), tokens=tokens,
                   bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_ids=eos_ids,
                   pad_id=meta.get("tokenizer.ggml.padding_token_id"),
                   chat_template=meta.get("tokenizer.chat_template"), source=source,
                   template_source=f"{source} (tokenizer.chat_template)")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> Tokenizer:
        """The tokenizer of a Hugging Face model folder (see the module docstring for the files
        read); TokenizerError naming the file for a missing ``tokenizer.json`` or malformed JSON."""
        return _read_folder(cls, Path(folder))

    # ------------------------------------------------------------------------- text
    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.backend.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.backend.id_to_token(self.eos_id)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``. ``add_bos=None``: as the tokenizer is set up (BOS, and EOS, when
        its source says so: what transformers' ``tokenizer(text)`` gives); ``True``: BOS then the
        text's ids; ``False``: the text's ids alone. Special tokens written in the text (such as
        ``<|im_start|>``) encode to their single id."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if add_bos is None:
            return self.backend.encode(text, add_special_tokens=True).ids
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if static_bool("add_bos", add_bos):
            if self.bos_id is None:
                raise ValueError(f"add_bos=True but the tokenizer of {self.source} has no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The text of token ids; ValueError naming them for ids outside [0, vocab_size)."""
        ids = [int(i) for i in ids]
        bad = sorted({i for i in ids if not 0 <= i < self.vocab_size})
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return self.backend.decode(ids, skip_special_tokens=static_bool("skip_special",
                                                                        skip_special))

    # ------------------------------------------------------------------------- chat
    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True, **extra) -> str:
        """The chat template rendered for ``messages`` (``bos_token``, ``eos_token`` and ``extra``
        are its other variables); TokenizerError when there is no template or it fails."""
        if not self.chat_template:
            raise TokenizerError(f"{self.source} has no chat template (a base model?): write the "
                                 "prompt text yourself and use encode")
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        variables = {k: v for k, v in variables.items() if v is not None} | extra
        TemplateError = require("jinja2.exceptions", "lm", "chat templates").TemplateError
        try:
            return render_chat_template(self.chat_template, messages,
                                        add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError as error:
            raise TokenizerError(f"the chat template of {self.template_source} failed to render: "
                                 f"{type(error).__name__}: {error}") from error

    def encode_chat(self, messages, add_generation_prompt: bool = True, **extra) -> list[int]:
        """Token ids of the rendered chat (the template writes any BOS itself)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra),
                           add_bos=False)


def render_chat_template(template: str, messages, **variables) -> str:
    """``template`` rendered with ``messages`` and ``variables`` (see the module docstring)."""
    return _compiled_template(template).render(messages=messages, **variables)


@functools.lru_cache(maxsize=16)
def _compiled_template(template: str):
    jinja2 = require("jinja2", "lm", "chat templates")
    sandbox = require("jinja2.sandbox", "lm", "chat templates")
    ext = require("jinja2.ext", "lm", "chat templates")

    class GenerationBlock(ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text): its content."""
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# ----------------------------------------------------------------------------- folders
def _read_json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path.parent}: no {path.name}")
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{path}: malformed JSON: {error}") from error
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(value, path: Path, key: str) -> tuple[str, dict] | None:
    """(content, AddedToken flags) of a special token given as a string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized")
                 if k in value}
        return value["content"], flags
    raise TokenizerError(f"{path}: {key} must be a string or an object with a 'content' string, "
                         f"got {value!r}")


def _chat_template(folder: Path, config: dict) -> tuple[str | None, str | None]:
    """(template, file it came from): ``chat_template.jinja`` first, as transformers reads it."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    template = config.get("chat_template")
    source = str(folder / "tokenizer_config.json")
    if template is None or isinstance(template, str):
        return template, source
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default"), f"{source} (chat_template 'default')"
    raise TokenizerError(f"{source}: chat_template must be a string or a list of "
                         f"{{name, template}} objects, got {type(template).__name__}")


def _eos_ids(folder: Path, eos_id: int | None, vocab_size: int) -> list[int]:
    """The model's EOS ids (`hf_loader.read_generation_eos`), else the tokenizer's own."""
    from targets.lm.hf_loader import CheckpointError, read_generation_eos
    try:
        listed = read_generation_eos(folder)
    except CheckpointError as e:
        raise TokenizerError(str(e)) from None
    bad = [i for i in listed if not i < vocab_size]
    if bad:
        raise TokenizerError(f"{folder}: eos_token_id {bad} outside the tokenizer's vocabulary "
                             f"[0, {vocab_size})")
    return list(listed) or ([] if eos_id is None else [eos_id])


def _read_folder(cls, folder: Path) -> Tokenizer:
    tokenizers = require("tokenizers", "lm", "the tokenizer")
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder not found: {folder}")
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise TokenizerError(f"{folder}: no tokenizer.json (a Hugging Face model folder keeps its "
                             "tokenizer there; a GGUF file carries its own: Tokenizer.from_gguf)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:  # the Rust parser raises a bare Exception
        raise TokenizerError(f"{tokenizer_file}: not a readable tokenizer.json: {error}") from error
    config_file = folder / "tokenizer_config.json"
    config = _read_json(config_file)
    special_map = _read_json(folder / "special_tokens_map.json")

    named = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value, path = config.get(key), config_file
        if value is None:
            value, path = special_map.get(key), folder / "special_tokens_map.json"
        token = _token_text(value, path, key)
        if token is not None:
            named[key] = token
            if backend.token_to_id(token[0]) is None:
                raise TokenizerError(f"{path}: {key} '{token[0]}' is not in the vocabulary of "
                                     f"{tokenizer_file}")
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
    if not isinstance(extra, list):
        extra = []  # a dict of named extra tokens (multimodal models): they are in tokenizer.json
    extra = [_token_text(value, config_file, "extra_special_tokens") for value in extra]
    # transformers makes these special added tokens (matched whole in text, skipped in decode)
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    backend.add_special_tokens([
        tokenizers.AddedToken(text, **({"normalized": False} | flags), special=True)
        for text, flags in [*named.values(), *extra] if text not in added])

    def token_id(key):
        return backend.token_to_id(named[key][0]) if key in named else None

    bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
    if backend.post_processor is None:
        # tokenizer.json's post-processor adds BOS/EOS (transformers 5 ignores these flags when
        # there is one); without one, the flags do, as they did in transformers 4
        bos = (named["bos_token"][0], bos_id) if config.get("add_bos_token") and bos_id is not None \
            else None
        eos = (named["eos_token"][0], eos_id) if config.get("add_eos_token") and eos_id is not None \
            else None
        backend.post_processor = framing(bos, eos)

    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [""] * (1 + max(vocab.values()))
    for text, i in vocab.items():
        tokens[i] = text
    template, template_source = _chat_template(folder, config)
    return cls(backend, tokens=tokens, bos_id=bos_id,
               eos_ids=_eos_ids(folder, eos_id, len(tokens)), pad_id=token_id("pad_token"),
               chat_template=template, source=str(folder), template_source=template_source)


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


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_steps(backend) -> list[dict]:
    decoder = backend.decoder
    if decoder is None:
        return []
    state = json.loads(decoder.__getstate__())
    return state["decoders"] if state.get("type") == "Sequence" else [state]


def _token_text_of(backend):
    """A function from a (non-added) token string to its bytes, chosen by the backend's decoder:
    byte-level BPE maps each character back to its byte; SentencePiece-style decoders replace
    ``▁`` by a space and, with byte fallback, ``<0xNN>`` by that byte."""
    steps = _decoder_steps(backend)
    kinds = {s.get("type") for s in steps}
    if "ByteLevel" in kinds:
        inverse = _byte_decoder()

        def byte_level(token: str) -> bytes:
            if all(c in inverse for c in token):
                return bytes(inverse[c] for c in token)
            return token.encode("utf-8")  # a token outside the byte alphabet is its own text
        return byte_level
    spaces = [s["replacement"] for s in steps if s.get("type") == "Metaspace"]
    spaces += [s["pattern"]["String"] for s in steps
               if s.get("type") == "Replace" and s.get("content") == " "
               and "String" in s.get("pattern", {})]
    unsupported = kinds - {"Metaspace", "Replace", "ByteFallback", "Fuse", "Strip"}
    if not spaces or unsupported:
        raise ValueError("token_bytes_of reads byte-level BPE and SentencePiece-style (▁) "
                         f"tokenizers; this decoder is {[s.get('type') for s in steps] or None}")
    byte_fallback = "ByteFallback" in kinds

    def sentencepiece(token: str) -> bytes:
        if byte_fallback and (match := _BYTE_PIECE.fullmatch(token)):
            return bytes([int(match.group(1), 16)])
        for space in spaces:
            token = token.replace(space, " ")
        return token.encode("utf-8")
    return sentencepiece


def token_bytes_of(tokenizer) -> list[bytes]:
    """UTF-8 bytes of every token id of a `Tokenizer` (or a ``tokenizers.Tokenizer``, or a
    transformers fast tokenizer), one entry per id.

    Byte-level BPE tokens map back through GPT-2's byte table; SentencePiece tokens have ``▁`` as
    a space (so a word-initial piece carries its space, as it does inside a continuation) and a
    byte piece ``<0xNN>`` is that one byte; added tokens (``<|im_start|>``, ``<eos>``) are their
    literal text, as ``decode`` shows them. The kind is read off the tokenizer's decoder; any
    other decoder is a ValueError.
    """
    candidates = (getattr(tokenizer, "backend", None), getattr(tokenizer, "backend_tokenizer", None),
                  tokenizer)
    backend = next((c for c in candidates if hasattr(c, "get_added_tokens_decoder")), None)
    if backend is None:
        raise TypeError(f"token_bytes_of needs a Tokenizer or a tokenizers.Tokenizer, got "
                        f"{type(tokenizer).__name__}")
    text_of = _token_text_of(backend)
    added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
    vocab = backend.get_vocab(with_added_tokens=True)
    out = [b""] * (1 + max(vocab.values()))
    for token, i in vocab.items():
        out[i] = added[i].encode("utf-8") if i in added else text_of(token)
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
