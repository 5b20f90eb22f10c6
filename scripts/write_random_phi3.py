"""Writes a full-size Phi-3-mini checkpoint with random weights, as a user's folder would hold
it: transformers' save_pretrained (bf16 safetensors, sharded) of Phi3ForCausalLM built from the
real Phi-3-mini-4k-instruct config, plus the real tokenizer. For running philo's commands on the
real shape where no real weights exist (speed does not depend on the values). Needs torch and
transformers (the GPU machine has both).

  python3 scripts/write_random_phi3.py OUT_DIR [--layers N] [--adapter ADAPTER_DIR]
                                       [--copy_cycle L] [--context 4k|128k]

--context 128k takes the Phi-3-mini-128k-instruct config (LongRoPE factors, 131,072 positions,
no sliding window in practice) instead of the 4k one; the weights' shapes are the same.

--layers keeps N decoder layers (a smaller model of the same family and tokenizer, e.g. a
speculative-decoding draft); --adapter also writes a random PEFT LoRA adapter for it (r 64,
alpha 128, on qkv_proj, o_proj, gate_up_proj and down_proj; B drawn normal(0, 0.01) rather than
PEFT's zeros, so the adapter changes the output).

--copy_cycle L writes a model that repeats text, for speculative decoding's high-acceptance
workload (random weights otherwise never repeat a prompt): every layer's o_proj and down_proj are
zero, so the last hidden state is the current token's embedding, and the LM head's row for token
j is the embedding of j's predecessor in its cycle (ids in consecutive runs of L, each a cycle;
the few ids past the last whole run follow themselves). Greedy decoding then continues the cycle
of the last token: given a prompt that holds a run of L ids, the model repeats it, which prompt
lookup predicts. The embeddings come from their own seed, so models of any --layers share them
(a draft agrees with its target). Its compute is the full model's: only values change.
"""
import argparse, json, os, shutil

import torch
from transformers import Phi3Config, Phi3ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--adapter")
    parser.add_argument("--copy_cycle", type=int)
    parser.add_argument("--context", choices=["4k", "128k"], default="4k")
    args = parser.parse_args()
    out = args.out
    with open(os.path.join(ROOT, f"tests/fixtures/configs/phi-3-mini-{args.context}-instruct.config.json")) as f:
        raw = json.load(f)
    if args.layers:
        raw["num_hidden_layers"] = args.layers
    config = Phi3Config(**{k: v for k, v in raw.items()
                           if not k.startswith("_") and k not in ("architectures", "torch_dtype", "auto_map")})
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Phi3ForCausalLM._from_config(config, dtype=torch.bfloat16)
    if args.copy_cycle:
        make_copying(model, args.copy_cycle)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ROOT, "assets/phi-3-tokenizer", name), out)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()):,} parameters")
    if args.adapter:
        from peft import LoraConfig, get_peft_model
        lora = LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
        peft_model = get_peft_model(model, lora)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.01)
        peft_model.save_pretrained(args.adapter)
        print(f"wrote the adapter {args.adapter}")


def make_copying(model, cycle):
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        generator = torch.Generator().manual_seed(1)
        embed = torch.randn(vocab, hidden, generator=generator) * 0.02
        ids = torch.arange(vocab)
        whole = vocab // cycle * cycle
        predecessor = ids.clone()
        predecessor[:whole] = ids[:whole] // cycle * cycle + (ids[:whole] - 1) % cycle
        model.model.embed_tokens.weight.copy_(embed)
        model.lm_head.weight.copy_(embed[predecessor])


if __name__ == "__main__":
    main()
