"""Our LoRA layer versus PEFT's on the same model, and merged versus base inference, side by side.

Measures, in one run on the same inputs, with the candidates interleaved so machine noise hits all alike:
  - a training step (forward + backward + AdamW step) with our LoRA and with PEFT's: ratio ours/PEFT;
  - an inference forward, unmerged, with ours and with PEFT's: ratio ours/PEFT;
  - inference of the base model versus our merged model (merge_and_unload): ratio merged/base.

    python -m benchmarks.bench_core [--device cpu|cuda] [--repeats 30]

Writes benchmarks/results/core.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model

from lora_analysis import apply_lora, merge_and_unload

RESULTS = Path(__file__).parent / "results"


def build(device: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=8, vocab_size=2000,
                                   max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg).to(device)


def timer(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def interleaved(candidates: dict, repeats: int, device: str, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each candidate, the candidates run in turn each repeat."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(timer(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    device = args.device
    targets, rank, alpha = ["q_proj", "k_proj", "v_proj", "o_proj"], 16, 32

    ours = apply_lora(build(device), targets=targets, rank=rank, alpha=alpha)
    theirs = get_peft_model(build(device), LoraConfig(target_modules=targets, r=rank, lora_alpha=alpha))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2000, (args.batch, args.seq), generator=g).to(device)

    def trainer(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()

        def step():
            opt.zero_grad(set_to_none=True)
            model(tokens, labels=tokens).loss.backward()
            opt.step()
        return step

    train = interleaved({"ours": trainer(ours), "peft": trainer(theirs)}, args.repeats, device)

    ours.eval()
    theirs.eval()
    base = build(device).eval()
    merged = merge_and_unload(copy.deepcopy(ours)).eval()

    def infer(model):
        def fwd():
            with torch.inference_mode():
                model(tokens)
        return fwd

    inference = interleaved({"ours": infer(ours), "peft": infer(theirs), "base": infer(base),
                             "merged": infer(merged)}, args.repeats, device)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads(), "device": device,
                    "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                    "torch": torch.__version__, "peft": __import__("peft").__version__},
        "model": "Llama-style, d=512, 4 layers, LoRA r=16 on q,k,v,o; batch %d x seq %d" % (args.batch, args.seq),
        "repeats": args.repeats,
        "train_step_s": train,
        "inference_s": inference,
        "ratios": {
            "train_step_ours_over_peft": train["ours"] / train["peft"],
            "inference_unmerged_ours_over_peft": inference["ours"] / inference["peft"],
            "inference_merged_over_base": inference["merged"] / inference["base"],
            "inference_unmerged_over_base": inference["ours"] / inference["base"],
        },
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"core{'-cuda' if device == 'cuda' else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'measure':40s} {'value':>10s}")
    for k, v in result["ratios"].items():
        print(f"{k:40s} {v:10.3f}")
    print(f"train step: ours {train['ours'] * 1e3:.1f} ms, PEFT {train['peft'] * 1e3:.1f} ms")
    print(f"inference: base {inference['base'] * 1e3:.1f} ms, merged {inference['merged'] * 1e3:.1f} ms, "
          f"unmerged ours {inference['ours'] * 1e3:.1f} ms, PEFT {inference['peft'] * 1e3:.1f} ms")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
