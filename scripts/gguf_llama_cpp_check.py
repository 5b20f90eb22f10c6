#!/usr/bin/env python3
"""philo's GGUF exports in llama.cpp (not CI): the reference fixtures' tiny models (tests/fixtures/
hf-reference/dev: mini4k, gqa_window, longrope) are exported by philo as f16, q8_0 and q4_k_m and
run by llama.cpp through llama-cpp-python. The f16 logits are compared with transformers' logits
in the fixtures (which philo's own logits match to 1e-6, tests/hf_parity.rs); the quantised
exports must load and greedy-decode. The fixtures' models have a 512-token vocabulary: each gets
the Phi-3 tokenizer's first 512 pieces.

    pip install --target /tmp/llamapy llama-cpp-python gguf safetensors numpy  # builds llama.cpp
    PYTHONPATH=/tmp/llamapy python3 scripts/gguf_llama_cpp_check.py target/release/philo
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from llama_cpp import Llama
from safetensors.numpy import load_file

philo = sys.argv[1]
repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
fixtures = os.path.join(repo, "tests/fixtures/hf-reference/dev")
phi3_tokenizer = json.load(open(os.path.join(repo, "assets/phi-3-tokenizer/tokenizer.json")))


def truncated_tokenizer(size):
    t = json.loads(json.dumps(phi3_tokenizer))
    vocab = {p: i for p, i in t["model"]["vocab"].items() if i < size}
    t["model"]["vocab"] = vocab
    t["model"]["merges"] = [m for m in t["model"]["merges"]
                            if all(x in vocab for x in m.split(" ")) and m.replace(" ", "") in vocab]
    t["added_tokens"] = [a for a in t["added_tokens"] if a["id"] < size]
    return t


failed = False
work = tempfile.mkdtemp()
print(f"{'case':<12} {'type':<7} {'input':<5} {'max |diff| / max |ref|':>24} {'argmax agree':>13} {'greedy (of 20)':>15}")
for case in ["mini4k", "gqa_window", "longrope"]:
    src = os.path.join(fixtures, case)
    model = os.path.join(work, case)
    shutil.copytree(src, model)
    config = json.load(open(os.path.join(model, "config.json")))
    json.dump(truncated_tokenizer(config["vocab_size"]), open(os.path.join(model, "tokenizer.json"), "w"))
    json.dump({"add_bos_token": False}, open(os.path.join(model, "tokenizer_config.json"), "w"))
    reference = json.load(open(os.path.join(model, "reference.json")))
    logits = load_file(os.path.join(model, "reference.safetensors"))
    for kind in ["f16", "q8_0", "q4_k_m"]:
        out = os.path.join(work, f"{case}-{kind}.gguf")
        subprocess.run([philo, "export", "--model", model, "--quant", kind, "--output", out],
                       check=True, capture_output=True)
        for name, tokens in reference["inputs"].items():
            # llama.cpp picks LongRoPE's factors by the context size, transformers by the
            # sequence's length: a context of exactly the sequence's length agrees with both.
            llm = Llama(model_path=out, n_ctx=len(tokens), n_batch=len(tokens), logits_all=True,
                        verbose=False, seed=0)
            llm.eval(tokens)
            got = np.array(llm.scores[: len(tokens)], dtype=np.float32)
            want = logits[f"logits.{name}"].astype(np.float32)
            rel = np.abs(got - want).max() / np.abs(want).max()
            agree = (got.argmax(-1) == want.argmax(-1)).mean()
            greedy = ""
            if name == "in0":
                prompt = reference["greedy"]["prompt"]
                expected = reference["greedy"]["new_tokens"]
                llm = Llama(model_path=out, n_ctx=max(64, len(prompt) + len(expected)), verbose=False)
                produced = []
                for tok in llm.generate(prompt, temp=0.0, top_k=1):
                    produced.append(tok)
                    if len(produced) == len(expected):
                        break
                same = next((i for i, (a, b) in enumerate(zip(produced, expected)) if a != b), len(expected))
                greedy = f"{same} same"
            print(f"{case:<12} {kind:<7} {name:<5} {rel:>24.2e} {agree:>13.0%} {greedy:>15}")
            if kind == "f16" and rel > 1e-2:
                failed = True
sys.exit(1 if failed else 0)
