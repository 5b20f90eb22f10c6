#!/usr/bin/env python3
"""Reference numbers for `philo bench`: the same shapes on the Python stack (PyTorch +
transformers, and PEFT + bitsandbytes for training), on a RANDOM Phi-3-mini-shaped model built
in memory (speed does not depend on the weight values). No network is used.

Each task prints ONE JSON line to stdout; progress goes to stderr.

  python3 scripts/bench_reference.py prefill --seq 2048 --batch 1
  python3 scripts/bench_reference.py decode --seq 128 --new_tokens 128 --batch 1
  python3 scripts/bench_reference.py train --batch 12 --seq 2048 --rank 64 --alpha 128 --quant nf4

How each number is measured (chosen to match `philo bench`):
  prefill  forward of batch x seq random ids, no KV cache, logits of the last position only
           (logits_to_keep=1), argmax read back; 1 warm-up, best of --repeats.
           tokens/s = batch * seq / seconds.
  decode   greedy model.generate(do_sample=False, min_new_tokens = max_new_tokens) on a seq-long
           prompt. philo times the decode steps only (the prefill is outside its clock), so
           tokens_per_second = batch * N / (T(N+1 new tokens) - T(1 new token)): the time of N
           decode steps. generate_tokens_per_second = batch * N / T(N) is the end-to-end rate,
           prefill included. 1 warm-up, best of --repeats for each.
  train    QLoRA as PEFT users do it: the random bf16 model is saved once to --model_dir (local
           disk, reused when present) and loaded back with a BitsAndBytesConfig (nf4, double
           quantisation, bf16 compute); prepare_model_for_kbit_training (gradient checkpointing,
           use_reentrant=False); LoRA on qkv_proj, o_proj, gate_up_proj, down_proj; AdamW over the
           LoRA parameters; labels = input_ids. --quant none: the same on a bf16 base built in
           memory. tokens/s = batch * seq * steps / seconds of `steps` optimizer steps after
           `warmup` steps.
  peak_memory_gib is torch.cuda.max_memory_allocated() of the whole process (model included;
  for nf4 the statistics are reset once, after the throw-away bf16 model used to write the
  checkpoint is freed, so the peak covers loading and training as a user sees it).
  peak_reserved_gib is the allocator's reserved high-water mark (closer to what nvidia-smi
  shows). On the CPU (--device cpu) both are the resident-set high-water mark of the process.
"""

import argparse
import gc
import inspect
import json
import os
import resource
import sys
import time

import torch
import transformers
from transformers import Phi3Config, Phi3ForCausalLM


def log(*args):
    print("[bench_reference]", *args, file=sys.stderr, flush=True)


def version_tuple(text):
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


TRANSFORMERS_VERSION = version_tuple(transformers.__version__)
# transformers 4.56 renamed from_pretrained's torch_dtype to dtype (5.x warns on the old name).
DTYPE_KWARG = "dtype" if TRANSFORMERS_VERSION >= (4, 56) else "torch_dtype"

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


# ----------------------------------------------------------------------------- model


def phi3_config(tiny):
    """The Phi-3-mini-4k shape (or a tiny one for smoke tests on the CPU)."""
    if tiny:
        shape = dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=128,
            vocab_size=1000,
            max_position_embeddings=4096,
            bos_token_id=1,
            eos_token_id=998,
            pad_token_id=999,
        )
    else:
        shape = dict(
            hidden_size=3072,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=8192,
            vocab_size=32064,
            max_position_embeddings=4096,
            bos_token_id=1,
            eos_token_id=32000,
            pad_token_id=32000,
        )
    params = inspect.signature(Phi3Config.__init__).parameters
    if "rope_parameters" in params:  # transformers 5.x
        shape["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    else:
        shape["rope_theta"] = 10000.0
    config = Phi3Config(
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        hidden_act="silu",
        attention_dropout=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        use_cache=True,
        **shape,
    )
    config._attn_implementation = "sdpa"
    return config


def build_random_model(config, dtype, device):
    """Phi3ForCausalLM(config) created directly on `device` in `dtype` (no fp32 detour)."""
    log(f"building a random model ({config.num_hidden_layers} layers, hidden {config.hidden_size}) "
        f"on {device} in {dtype} ...")
    start = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Phi3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    setattr(model.config, DTYPE_KWARG, dtype)
    model.eval()
    synchronize(device)
    params = sum(p.numel() for p in model.parameters())
    log(f"built {params / 1e9:.2f} B parameters in {time.perf_counter() - start:.1f} s")
    return model


def attn_name(model):
    return getattr(model.config, "_attn_implementation", None)


# ----------------------------------------------------------------------------- measurement


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device):
    """(allocated, reserved) peak in GiB; on the CPU both are the resident-set high-water mark."""
    if torch.device(device).type == "cuda":
        return (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return (rss, rss)


def random_ids(batch, seq, vocab, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Stay clear of the special ids at both ends of the vocabulary.
    ids = torch.randint(100, vocab - 100, (batch, seq), generator=generator)
    return ids.to(device)


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def best_of(fn, device, warmup, repeats):
    for _ in range(warmup):
        timed(fn, device)
    return min(timed(fn, device) for _ in range(max(1, repeats)))


def base_record(args, task, model_config, device, dtype_name):
    return {
        "stack": "transformers",
        "task": task,
        "device": torch.device(device).type,
        "dtype": dtype_name,
        "layers": model_config.num_hidden_layers,
        "batch": args.batch,
        "seq": args.seq,
    }


def versions():
    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # noqa: BLE001 - absent or broken: just not reported
        pass
    return out


# ----------------------------------------------------------------------------- tasks


def run_prefill(args, device):
    config = phi3_config(args.tiny)
    dtype = DTYPES[args.dtype]
    model = build_random_model(config, dtype, device)
    ids = random_ids(args.batch, args.seq, config.vocab_size, device)
    forward_params = inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {"num_logits_to_keep": 1}

    def step():
        with torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False, **keep).logits
            logits[:, -1].argmax(-1).tolist()

    log(f"prefill batch {args.batch} x seq {args.seq}: warm-up + best of {args.repeats} ...")
    seconds = best_of(step, device, warmup=1, repeats=args.repeats)
    tokens = args.batch * args.seq
    peak, reserved = peak_memory(device)
    record = base_record(args, "prefill", config, device, args.dtype)
    record.update(
        tokens=tokens,
        seconds=seconds,
        tokens_per_second=tokens / seconds,
        peak_memory_gib=peak,
        peak_reserved_gib=reserved,
        attn_implementation=attn_name(model),
    )
    return record


def run_decode(args, device):
    config = phi3_config(args.tiny)
    dtype = DTYPES[args.dtype]
    model = build_random_model(config, dtype, device)
    ids = random_ids(args.batch, args.seq, config.vocab_size, device)
    mask = torch.ones_like(ids)
    n = args.new_tokens

    def generate(count):
        def go():
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=count,
                    min_new_tokens=count,
                    pad_token_id=config.pad_token_id,
                    use_cache=True,
                )
            if out.shape[1] != ids.shape[1] + count:
                raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, "
                                   f"wanted {count}")

        return go

    log(f"decode batch {args.batch}, prompt {args.seq}, {n} new tokens: "
        f"warm-up + best of {args.repeats} for 1, {n} and {n + 1} new tokens ...")
    t_first = best_of(generate(1), device, warmup=1, repeats=args.repeats)
    t_n = best_of(generate(n), device, warmup=1, repeats=args.repeats)
    t_n1 = best_of(generate(n + 1), device, warmup=0, repeats=args.repeats)
    decode_seconds = t_n1 - t_first
    tokens = args.batch * n
    peak, reserved = peak_memory(device)
    record = base_record(args, "decode", config, device, args.dtype)
    record.update(
        new_tokens=n,
        tokens=tokens,
        seconds=decode_seconds,
        tokens_per_second=tokens / decode_seconds if decode_seconds > 0 else None,
        generate_seconds=t_n,
        generate_tokens_per_second=tokens / t_n,
        first_token_seconds=t_first,
        peak_memory_gib=peak,
        peak_reserved_gib=reserved,
        attn_implementation=attn_name(model),
    )
    return record


def saved_model_dir(args, config, dtype):
    """Write the random bf16 model to args.model_dir once; reuse it when it is already there."""
    path = args.model_dir or ("/tmp/philo-ref-model-tiny" if args.tiny else "/tmp/philo-ref-model")
    marker = os.path.join(path, "philo-ref-complete.json")
    wanted = {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "dtype": str(dtype),
    }
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == wanted:
                log(f"reusing the random checkpoint in {path}")
                return path
    log(f"writing the random {dtype} checkpoint to {path} (once) ...")
    # The throw-away model is built where the benchmark runs (fast on a GPU); it is freed and
    # the peak statistics reset before the quantised load, so it does not count.
    model = build_random_model(config, dtype, args.device_resolved)
    start = time.perf_counter()
    model.save_pretrained(path)
    with open(marker, "w") as f:
        json.dump(wanted, f)
    log(f"saved in {time.perf_counter() - start:.1f} s")
    del model
    gc.collect()
    if torch.device(args.device_resolved).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return path


def run_train(args, device):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    config = phi3_config(args.tiny)
    dtype = DTYPES[args.dtype]
    if args.quant == "nf4":
        from transformers import BitsAndBytesConfig

        path = saved_model_dir(args, config, dtype)
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        device_map = {"": torch.cuda.current_device()} if torch.device(device).type == "cuda" else {"": "cpu"}
        log(f"loading {path} in 4 bit (nf4, double quant, {args.dtype} compute) ...")
        start = time.perf_counter()
        model = Phi3ForCausalLM.from_pretrained(
            path,
            quantization_config=quantization,
            device_map=device_map,
            attn_implementation="sdpa",
            **{DTYPE_KWARG: dtype},
        )
        log(f"loaded in {time.perf_counter() - start:.1f} s")
    else:
        model = build_random_model(config, dtype, device)

    model.config.use_cache = False
    # For a 4-bit model this freezes the base, upcasts the remaining non-quantised weights
    # (norms, embedding, lm_head) to fp32 and turns on gradient checkpointing; for a bf16 base
    # it freezes and turns on gradient checkpointing.
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.lora_dtype == "model":
        # The adapter in the compute dtype instead of PEFT's default fp32.
        for p in trainable:
            p.data = p.data.to(dtype)
    lora_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainable})
    log(f"LoRA r={args.rank} alpha={args.alpha}: {sum(p.numel() for p in trainable) / 1e6:.1f} M "
        f"trainable parameters ({', '.join(lora_dtypes)})")
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    model.train()

    ids = random_ids(args.batch, args.seq, config.vocab_size, device)
    losses = []

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    log(f"train batch {args.batch} x seq {args.seq}, quant {args.quant}: "
        f"{args.warmup} warm-up + {args.steps} timed steps ...")
    for i in range(args.warmup):
        seconds = timed(step, device)
        log(f"warm-up step {i + 1}: {seconds:.2f} s, loss {losses[-1]:.4f}")
    synchronize(device)
    start = time.perf_counter()
    for i in range(args.steps):
        step()
        log(f"step {i + 1}: loss {losses[-1]:.4f}")
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens = args.batch * args.seq * args.steps
    peak, reserved = peak_memory(device)
    record = base_record(args, "train", config, device, args.dtype)
    record.update(
        quant=args.quant,
        linear4bit_layers=sum(1 for m in model.modules() if type(m).__module__.startswith("bitsandbytes")
                              and type(m).__name__ == "Linear4bit"),
        rank=args.rank,
        alpha=args.alpha,
        lora_dtype=",".join(lora_dtypes),
        gradient_checkpointing=True,
        steps=args.steps,
        warmup=args.warmup,
        tokens=tokens,
        seconds=seconds,
        tokens_per_second=tokens / seconds,
        step_seconds=seconds / max(1, args.steps),
        loss=losses[-1] if losses else None,
        peak_memory_gib=peak,
        peak_reserved_gib=reserved,
        attn_implementation=attn_name(model.base_model.model if hasattr(model, "base_model") else model),
    )
    return record


# ----------------------------------------------------------------------------- CLI


DEFAULTS = {
    "prefill": {"batch": 1, "seq": 2048},
    "decode": {"batch": 1, "seq": 128},
    "train": {"batch": 12, "seq": 2048},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Reference throughput (PyTorch/transformers/PEFT) on a random Phi-3-mini-shaped model.",
    )
    parser.add_argument("task", nargs="?", choices=sorted(DEFAULTS), help="what to measure")
    parser.add_argument("--task", dest="task_flag", choices=sorted(DEFAULTS), help="same as the positional task")
    parser.add_argument("--batch", type=int, help="sequences per batch (prefill/decode 1, train 12)")
    parser.add_argument("--seq", type=int, help="prefill/train: tokens per sequence (2048); decode: prompt length (128)")
    parser.add_argument("--new_tokens", "--new-tokens", type=int, default=128, help="decode: new tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="prefill/decode: best of this many timed runs")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="model/compute dtype")
    parser.add_argument("--rank", type=int, default=64, help="train: LoRA rank")
    parser.add_argument("--alpha", type=float, default=128.0, help="train: LoRA alpha")
    parser.add_argument("--dropout", type=float, default=0.05, help="train: LoRA dropout")
    parser.add_argument("--lr", type=float, default=2e-4, help="train: AdamW learning rate")
    parser.add_argument("--quant", choices=["nf4", "none"], default="nf4", help="train: base weights in nf4 (QLoRA) or the dtype")
    parser.add_argument("--lora_dtype", choices=["fp32", "model"], default="fp32",
                        help="train: adapter weights in fp32 (PEFT's default) or in the model dtype")
    parser.add_argument("--steps", type=int, default=4, help="train: timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="train: untimed steps first")
    parser.add_argument("--model_dir", help="train --quant nf4: where the random checkpoint is written/reused "
                                            "(default /tmp/philo-ref-model)")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    # Smoke tests only: a tiny model (hidden 64, 2 layers, vocab 1000) on the CPU.
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.task and args.task_flag and args.task != args.task_flag:
        parser.error(f"two different tasks given: {args.task} and {args.task_flag}")
    args.task = args.task or args.task_flag
    if not args.task:
        parser.error("name a task: prefill, decode or train")
    for key, value in DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch < 1 or args.seq < 1 or args.new_tokens < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("batch, seq, new_tokens and steps must be positive, warmup not negative")
    if args.device == "auto":
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    args.device_resolved = device
    torch.manual_seed(args.seed)
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    run = {"prefill": run_prefill, "decode": run_decode, "train": run_train}[args.task]
    record = run(args, device)
    record["versions"] = versions()
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
