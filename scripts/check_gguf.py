#!/usr/bin/env python3
"""Reads a GGUF file philo exported with the `gguf` package (llama.cpp's own reader) and checks
it against the model folder it came from: architecture and metadata keys, tensor names and
shapes, and the dequantised weights within the format's error. Prints one line per check;
exits 1 on the first failure.

    python3 scripts/check_gguf.py FILE.gguf MODEL_DIR TYPE   # TYPE: f32, f16 or q8_0
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import load_file

path, model_dir, kind = sys.argv[1], sys.argv[2], sys.argv[3]
reader = GGUFReader(path)
config = json.load(open(f"{model_dir}/config.json"))


def field(name):
    f = reader.fields[name]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0].name == "STRING" else value[0]


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        sys.exit(1)


check(field("general.architecture") == "phi3", "general.architecture is phi3")
for key, want in [
    ("phi3.block_count", config["num_hidden_layers"]),
    ("phi3.embedding_length", config["hidden_size"]),
    ("phi3.feed_forward_length", config["intermediate_size"]),
    ("phi3.attention.head_count", config["num_attention_heads"]),
    ("phi3.context_length", config["max_position_embeddings"]),
]:
    check(int(field(key)) == want, f"{key} = {want}")
tokens = reader.fields["tokenizer.ggml.tokens"]
check(len(tokens.data) == config["vocab_size"], f"{len(tokens.data)} tokens")

weights = load_file(f"{model_dir}/model.safetensors")
names = {t.name: t for t in reader.tensors}
layers = config["num_hidden_layers"]
expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
for i in range(layers):
    for n in ["attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"]:
        expected.add(f"blk.{i}.{n}.weight")
check(set(names) == expected, f"{len(expected)} tensors with llama.cpp's phi3 names")

hf = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
      "blk.0.attn_qkv.weight": "model.layers.0.self_attn.qkv_proj.weight",
      "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight"}
for gguf_name, hf_name in hf.items():
    t = names[gguf_name]
    source = weights[hf_name].astype(np.float32)
    values = dequantize(t.data, t.tensor_type).reshape(source.shape).astype(np.float32)
    check(tuple(int(d) for d in reversed(t.shape)) == source.shape, f"{gguf_name} shape {source.shape}")
    err = np.abs(values - source).max()
    # Q8_0: a block of 32 shares absmax/127 (an f16 scale): error up to half a step.
    bound = {"f32": 0.0, "f16": 1e-3 * np.abs(source).max(), "q8_0": np.abs(source).max() / 127}[kind]
    check(err <= bound, f"{gguf_name} {t.tensor_type.name}: max error {err:.3g} <= {bound:.3g}")
