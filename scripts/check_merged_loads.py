#!/usr/bin/env python3
"""Check that a checkpoint merged by philo loads in Hugging Face transformers and computes the
same logits as philo did.

  python3 scripts/check_merged_loads.py --merged DIR --logits FILE

FILE is JSON written on the philo side: {"input_ids": [...], "logits": [[...], ...]} where
"logits" holds one row of vocab-size values per position (only the last row is compared, so a
single row of the last position is fine too). The model is loaded on the CPU in float32, the
ids are run once, and the max absolute and relative (max |diff| / max |reference|) differences
of the last-position logits are printed. Exit status 1 when the relative difference exceeds
--tolerance (1e-3) or when transformers reports missing, unexpected or mismatched weights; 2
when the files cannot be used.
"""

import argparse
import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM


def version_tuple(text):
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# transformers 4.56 renamed from_pretrained's torch_dtype to dtype (5.x warns on the old name).
DTYPE_KWARG = "dtype" if version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--merged", required=True, help="folder of the merged HF checkpoint")
    parser.add_argument("--logits", required=True, help='JSON file {"input_ids": [...], "logits": [[...]]}')
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest relative difference accepted")
    args = parser.parse_args()

    with open(args.logits) as f:
        data = json.load(f)
    input_ids = [int(i) for i in data["input_ids"]]
    philo = torch.tensor(data["logits"], dtype=torch.float32)
    while philo.dim() > 1:  # [batch][seq][vocab] or [seq][vocab]: keep the last position
        philo = philo[0] if philo.dim() == 3 else philo[-1]
    if not input_ids:
        print("error: input_ids is empty", file=sys.stderr)
        return 2

    model, info = AutoModelForCausalLM.from_pretrained(
        args.merged, output_loading_info=True, **{DTYPE_KWARG: torch.float32}
    )
    model.eval()
    # A tensor the model wants but the folder lacks would be randomly initialised; a leftover
    # one (e.g. an unmerged lora_A) would be ignored: either way the merge is broken.
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    for kind, names in problems.items():
        if names:
            print(f"{kind}: {len(names)}: {', '.join(map(str, names[:8]))}{' ...' if len(names) > 8 else ''}")
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([input_ids]), use_cache=False).logits
    reference = logits[0, -1].float()
    if reference.shape != philo.shape:
        print(f"error: transformers gives {tuple(reference.shape)} logits, the file "
              f"{tuple(philo.shape)}", file=sys.stderr)
        return 2

    max_abs = (reference - philo).abs().max().item()
    relative = max_abs / max(reference.abs().max().item(), 1e-12)
    same_argmax = int(reference.argmax()) == int(philo.argmax())
    print(f"model:        {type(model).__name__} from {args.merged}")
    print(f"tokens:       {len(input_ids)}, vocab {reference.shape[0]}")
    print(f"max abs diff: {max_abs:.3e}")
    print(f"relative:     {relative:.3e} (tolerance {args.tolerance:g})")
    print(f"argmax:       transformers {int(reference.argmax())}, philo {int(philo.argmax())}"
          f"{'' if same_argmax else '  (DIFFERENT)'}")
    ok = relative <= args.tolerance and not any(problems.values())
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
