"""Writes a full-size Phi-3-mini checkpoint with random weights, as a user's folder would hold
it: transformers' save_pretrained (bf16 safetensors, sharded) of Phi3ForCausalLM built from the
real Phi-3-mini-4k-instruct config, plus the real tokenizer. For running philo's commands on the
real shape where no real weights exist (speed does not depend on the values). Needs torch and
transformers (the GPU machine has both).

  python3 scripts/write_random_phi3.py OUT_DIR
"""
import json, os, shutil, sys

import torch
from transformers import Phi3Config, Phi3ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main():
    out = sys.argv[1]
    with open(os.path.join(ROOT, "tests/fixtures/configs/phi-3-mini-4k-instruct.config.json")) as f:
        raw = json.load(f)
    config = Phi3Config(**{k: v for k, v in raw.items()
                           if not k.startswith("_") and k not in ("architectures", "torch_dtype")})
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Phi3ForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ROOT, "assets/phi-3-tokenizer", name), out)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
