"""Training step time and LLM-side MFU of a JSTIPModel at a realistic size on one GPU.

Model: a ~1B Llama-family LLM with random weights (16 layers, hidden 2048, FFN 8192, 32 heads, 8 KV groups,
vocab 32000) + a FastConformer-L-size encoder (17 layers, d_model 512, 8 heads, dw_striding x8, 80 mel) + an MLP
adapter. The tokenizer is a tiny synthetic BPE (JSTIPModel needs one); ``llm.vocab_size`` is set to the vocab size
wanted and the batch is random token ids, built directly in the batch contract of ``nemo_jstip/data/dataset.py``
(input_ids, labels, loss_mask, audio_item, audio_frame, audio, audio_lens): ``--speech-frac`` of each row's
positions are speech frames taken from ``--audio-seconds`` long random waveforms (as many per row as needed).

One step = what ``JSTIPModel.training_step`` does without a Trainer (as tests/models/test_overfit.py): the model's
engine step (Megatron schedule, 1 microbatch by default, Megatron DDP, the engine's global-norm clipping, Megatron's
optimizer wrapper around a fused torch AdamW), timed with CUDA synchronisation after ``--warmup`` untimed steps.
``--batch 8,2`` measures several batch sizes on one model. Speed options, each reported as part of the label:
``--foreach`` (Megatron's multi-tensor helpers as torch._foreach ops: without TE/apex it falls back to one kernel
and one host sync per parameter), ``--compile [MODE]`` (torch.compile of every LLM and Conformer layer).

MFU (LLM side only; encoder + adapter FLOPs are not counted but their time is in the step):
    flops/step = 6 * (N_nonemb + V*h) * T  +  6 * n_layers * (heads*head_dim) * S^2 * B
with T = B*S tokens (every position, speech frames included, passes the LLM), N_nonemb = LLM parameters without
the input embedding and output layer, V*h the output (logit) layer, and the attention term = 3 (fwd+bwd) x 2
matmuls (QK^T, PV) x 2 flops/MAC x S^2 x width, halved for the causal mask. MFU = flops/step / (step time * peak);
peak = dense BF16 peak of the device (H100 SXM / H200: 989e12), or --peak-tflops. FP8 runs are also divided by the
BF16 peak (so FP8 MFU > 100% of BF16 would be possible in principle; the number compares runs, not dtypes).

    python benchmarks/bench_gpu.py                              # all configurations that can run here
    python benchmarks/bench_gpu.py --configs local-bf16-autocast --out bench.json
    python benchmarks/bench_gpu.py --device cpu --tiny --steps 2   # CPU smoke run (tiny sizes)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# name -> (layer_spec, params_dtype, fp8, fp8_recipe); every run uses torch.autocast(bf16) on CUDA
CONFIGS = {
    "local-bf16-autocast": ("local", "float32", None, None),
    "local-bf16-params": ("local", "bfloat16", None, None),
    "te-bf16-autocast": ("te", "float32", None, None),
    "te-bf16-params": ("te", "bfloat16", None, None),
    "te-fp8-delayed": ("te", "float32", "hybrid", "delayed"),
    "te-fp8-tensorwise": ("te", "float32", "hybrid", "tensorwise"),
}
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12),
             ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU smoke run")
    p.add_argument("--configs", default="all", help="comma list of " + ", ".join(CONFIGS) + " (or all)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", default="2", help="rows per microbatch; a comma list measures each on the same model")
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--llm-layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-groups", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--enc-layers", type=int, default=17)
    p.add_argument("--enc-dim", type=int, default=512)
    p.add_argument("--enc-heads", type=int, default=8)
    p.add_argument("--mel", type=int, default=80)
    p.add_argument("--speech-frac", type=float, default=0.25)
    p.add_argument("--audio-seconds", type=float, default=16.0)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense BF16 peak; default from the device name")
    p.add_argument("--foreach", action="store_true", help="Megatron's multi-tensor helpers via torch._foreach ops")
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile each LLM and Conformer layer (reduce-overhead adds CUDA graphs)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--torch-profile", type=int, default=0, metavar="N",
                   help="after timing, N steps under torch.profiler: top kernels by device time (where a step goes)")
    a = p.parse_args(argv)
    if a.tiny:
        a.seq, a.llm_layers, a.hidden, a.ffn, a.heads, a.kv_groups, a.vocab = 256, 2, 128, 256, 4, 2, 512
        a.enc_layers, a.enc_dim, a.enc_heads, a.mel, a.audio_seconds = 2, 64, 2, 32, 4.0
    a.batches = [int(b) for b in str(a.batch).split(",")]
    return a


def model_config(a, tok_dir: str, spec: str, params_dtype: str, fp8, recipe) -> dict:
    llm = {"num_layers": a.llm_layers, "hidden_size": a.hidden, "ffn_hidden_size": a.ffn,
           "num_attention_heads": a.heads, "num_query_groups": a.kv_groups, "vocab_size": a.vocab,
           "max_sequence_length": a.seq, "layer_spec": spec, "params_dtype": params_dtype, "train_mode": "full"}
    if fp8:
        llm.update(fp8=fp8, fp8_recipe=recipe)
    perception = {
        "preprocessor": {"sample_rate": 16000, "features": a.mel, "window_size": 0.025, "window_stride": 0.01,
                         "n_fft": 512},
        "encoder": {"feat_in": a.mel, "n_layers": a.enc_layers, "d_model": a.enc_dim, "n_heads": a.enc_heads,
                    "subsampling": "dw_striding", "subsampling_factor": 8,
                    "subsampling_conv_channels": min(256, a.enc_dim), "ff_expansion_factor": 4,
                    "conv_kernel_size": 9},
        "adapter": {"type": "mlp", "stack": 1, "hidden_size": a.hidden, "output_size": a.hidden},
    }
    return {"tokenizer": {"path": tok_dir}, "perception": perception, "llm": llm, "interleave": {"mode": "mixed"},
            "max_grad_norm": 1.0, "seed": 1234}


def synthetic_batch(a, B: int, frame_spec, vocab: int, device) -> dict:
    """One microbatch in the dataset contract: speech frames in runs at the start of each row, text after."""
    L = a.seq
    n_samples = int(a.audio_seconds * frame_spec.sample_rate)
    per_item = frame_spec.num_frames(n_samples)
    speech = int(a.speech_frac * L)
    items_per_row = max(1, math.ceil(speech / per_item)) if speech else 0
    input_ids = torch.randint(0, vocab, (B, L))
    labels = torch.randint(0, vocab, (B, L))
    audio_item = torch.full((B, L), -1, dtype=torch.long)
    audio_frame = torch.full((B, L), -1, dtype=torch.long)
    for b in range(B):
        pos = torch.arange(speech)
        audio_item[b, :speech] = b * items_per_row + pos // per_item
        audio_frame[b, :speech] = pos % per_item
    labels[audio_item >= 0] = -100  # no loss on speech positions
    A = B * items_per_row
    batch = {
        "input_ids": input_ids, "labels": labels, "loss_mask": (labels != -100).float(),
        "audio_item": audio_item, "audio_frame": audio_frame, "seq_lens": torch.full((B,), L),
        "audio": 0.1 * torch.randn(A, n_samples), "audio_lens": torch.full((A,), n_samples),
    }
    batch["audio_num_frames"] = frame_spec.num_frames_batch(batch["audio_lens"])
    return {k: v.to(device) for k, v in batch.items()}


def llm_flops(gpt, a, tokens_per_step: int) -> tuple[float, int]:
    emb = {id(gpt.embedding.word_embeddings.weight)}
    out = getattr(gpt, "output_layer", None)
    out_params = out.weight.numel() if out is not None and out.weight is not None else 0
    if out is not None and out.weight is not None:
        emb.add(id(out.weight))
    n_nonemb = sum(p.numel() for p in gpt.parameters() if id(p) not in emb)
    if out_params == 0:  # tied: the logit matmul still runs
        out_params = gpt.embedding.word_embeddings.weight.numel()
    width = a.heads * (a.hidden // a.heads)
    seqs = tokens_per_step // a.seq
    flops = 6 * (n_nonemb + out_params) * tokens_per_step + 6 * a.llm_layers * width * a.seq**2 * seqs
    return float(flops), n_nonemb


def peak_flops(a, device) -> tuple[float | None, str]:
    if device.type != "cuda":
        name = "cpu"
        return (a.peak_tflops * 1e12 if a.peak_tflops else None), name
    name = torch.cuda.get_device_name()
    if a.peak_tflops:
        return a.peak_tflops * 1e12, name
    for key, peak in PEAK_BF16:
        if key in name:
            return peak, name
    return None, name


def engine_step(model, optimizer):
    """The one place that calls the model's training API: ``step(batches) -> loss``."""
    model.engine.wrap_optimizer(optimizer)
    return lambda batches: model.engine.train_step(batches)["loss"]


def compile_layers(model, mode: str) -> int:
    """torch.compile every LLM decoder layer and Conformer layer in place (names and parameters unchanged)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import layers as tp_layers

    # Megatron's linears look up their TP group per call, warning through torch.distributed.get_rank() when it is
    # None: a graph break (and a recompile per linear shape) in every row-parallel linear. Same group, no warning.
    tp_layers.get_tensor_model_parallel_group_if_none = (
        lambda group, is_expert=False, check_initialized=True: group if group is not None else (
            ps.get_expert_tensor_parallel_group() if is_expert else ps.get_tensor_model_parallel_group()))
    layers = [*model.stage.gpt.decoder.layers, *model.stage.perception.encoder.layers]
    for layer in layers:
        layer.compile(mode=None if mode == "default" else mode, dynamic=False)
    return len(layers)


def label(name: str, a, B: int) -> str:
    opts = "".join(f"+{o}" for o, on in (("foreach", a.foreach), (f"compile-{a.compile}", a.compile)) if on)
    return f"{name}{opts} {B}x{a.microbatches}x{a.seq}"


def run_config(name: str, a, tok_dir: str, device) -> list[dict]:
    from omegaconf import OmegaConf

    from nemo_jstip.models.jstip_model import JSTIPModel
    from nemo_jstip.modules.llm import te_available

    spec, params_dtype, fp8, recipe = CONFIGS[name]
    if spec == "te" and not te_available():
        return [{"config": name, "skipped": "Transformer Engine does not import here"}]
    if device.type == "cpu" and (spec == "te" or fp8):
        return [{"config": name, "skipped": "needs CUDA"}]
    torch.manual_seed(0)
    model = JSTIPModel(OmegaConf.create(model_config(a, tok_dir, spec, params_dtype, fp8, recipe)))
    model.stage.to(device)
    if a.compile:
        compile_layers(model, a.compile)
    params = [p for p in model.stage.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=device.type == "cuda")
    train_step = engine_step(model, opt)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    peak, _ = peak_flops(a, device)
    out = []
    for B in a.batches:
        try:
            out.append(measure(name, a, B, model, train_step, autocast, sync, peak, device))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at the largest batch: keep the others
            traceback.print_exc(limit=3)
            out.append({"config": name, "label": label(name, a, B),
                        "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del model, opt, params, train_step
    return out


def measure(name: str, a, B: int, model, train_step, autocast, sync, peak, device) -> dict:
    """One batch size: warmup, timed steps, LLM-side FLOPs and MFU, peak memory."""
    batches = [synthetic_batch(a, B, model.frame_spec, model.llm_cfg.vocab_size, device)
               for _ in range(a.microbatches)]
    tokens = sum(b["input_ids"].numel() for b in batches)

    def step() -> float:
        with autocast:
            return train_step(batches)

    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = [step() for _ in range(a.steps)]
    sync()
    dt = (time.perf_counter() - t0) / max(a.steps, 1)
    if a.torch_profile:
        torch_profile(step, a.torch_profile, device, label(name, a, B))
    flops, n_nonemb = llm_flops(model.stage.gpt, a, tokens)
    n_enc = sum(p.numel() for p in model.stage.perception.parameters())
    mfu = flops / (dt * peak) if peak else None
    r = {"config": name, "label": label(name, a, B), "batch": B, "microbatches": a.microbatches, "seq": a.seq,
         "foreach": a.foreach, "compile": a.compile, "step_ms": 1e3 * dt, "tokens_per_s": tokens / dt,
         "mfu": mfu, "mfu_pct": 100 * mfu if mfu is not None else None, "tflops_per_s": flops / dt / 1e12,
         "llm_flops_per_step": flops, "llm_nonemb_params": n_nonemb, "perception_params": n_enc,
         "tokens_per_step": tokens, "loss_last": losses[-1] if losses else None, "warmup_s": warmup_s,
         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    print(f"[done] {r['label']}: {r['step_ms']:.1f} ms/step, loss {r['loss_last']:.3f}, warmup {warmup_s:.1f} s",
          flush=True)
    return r


def torch_profile(step, n: int, device, name: str) -> None:
    """``n`` steps under torch.profiler: operators by self device time (self CPU time on the CPU). A step whose
    kernels add up to much less than its wall time is host-bound (launch overhead, synchronisation)."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync()
    wall = (time.perf_counter() - t0) / n
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    if device.type == "cuda":  # kernels only (an operator's self device time repeats its kernels')
        busy = sum(e.self_device_time_total for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation) / n / 1e3
    else:
        busy = sum(e.self_cpu_time_total for e in events) / n / 1e3
    print(f"\n{name}: {n} steps under torch.profiler: {1e3 * wall:.1f} ms/step wall, {busy:.1f} ms/step of "
          f"{'kernels' if device.type == 'cuda' else 'CPU ops'}; top operators by {key}")
    print(events.table(sort_by=key, row_limit=30, max_name_column_width=70))


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but CUDA is not available (use --device cpu for a smoke run)")
    if device.type == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the model picks CUDA whenever it is visible
    names = list(CONFIGS) if a.configs == "all" else a.configs.split(",")
    if device.type == "cpu" and a.configs == "all":
        names = ["local-bf16-autocast"]  # runs in fp32 on the CPU (no autocast): a smoke run, not a measurement
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configs {unknown}; choose from {list(CONFIGS)}")

    from nemo_jstip.prep.tokenizer import train_tokenizer

    g = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(letters[i] for i in torch.randint(0, 26, (int(n),), generator=g))
             for n in torch.randint(2, 9, (2000,), generator=g)]
    tok_dir = tempfile.mkdtemp(prefix="bench_tok_")
    train_tokenizer([" ".join(words[i:i + 20]) for i in range(0, 2000, 20)], 300, tok_dir)

    peak, dev_name = peak_flops(a, device)
    print(f"device: {dev_name}; peak BF16 {peak / 1e12 if peak else 'unknown'} TFLOP/s; torch {torch.__version__}")
    print(f"LLM {a.llm_layers}L h{a.hidden} ffn{a.ffn} {a.heads}h/{a.kv_groups}kv vocab {a.vocab}; encoder "
          f"{a.enc_layers}L d{a.enc_dim}; seq {a.seq} x batch {a.batch} x {a.microbatches} microbatch(es); "
          f"foreach {a.foreach}, compile {a.compile}; "
          f"speech {a.speech_frac:.0%} of positions from {a.audio_seconds:g} s clips; {a.warmup} warmup + {a.steps} steps")
    if a.foreach:
        from nemo_jstip.parallel.cpu import foreach_multi_tensor

        foreach_multi_tensor()
    results = []
    for name in names:
        try:
            rs = run_config(name, a, tok_dir, device)
        except Exception as e:  # noqa: BLE001 - report and go on with the next configuration
            traceback.print_exc(limit=3)
            rs = [{"config": name, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}]
        for r in rs:
            if "skipped" in r:
                print(f"[skip] {name}: {r['skipped']}")
        results += rs
        if a.out:  # after every configuration: a run stopped at its time limit keeps what it measured
            Path(a.out).write_text(json.dumps({"device": dev_name, "peak_flops": peak, "args": vars(a),
                                               "results": results}, indent=2))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{'config':<44} {'step ms':>10} {'tokens/s':>12} {'TFLOP/s':>9} {'MFU %':>7} {'mem GiB':>8}")
    for r in results:
        if "skipped" in r:
            print(f"{r['config']:<44} {'skipped: ' + r['skipped']}")
            continue
        mfu = f"{r['mfu_pct']:.1f}" if r["mfu_pct"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        print(f"{r['label']:<44} {r['step_ms']:>10.1f} {r['tokens_per_s']:>12.0f} {r['tflops_per_s']:>9.2f} "
              f"{mfu:>7} {mem:>8}")
    if a.out:
        print(f"wrote {a.out}")
    return results


if __name__ == "__main__":
    main()
