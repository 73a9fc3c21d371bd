"""The megatron-core CPU shim: inactive with CUDA, and each path it patches works on the CPU (real gloo ranks)."""

import subprocess
import sys

import pytest
import torch

from nemo_jstip.parallel import cpu
from nemo_jstip.parallel.dist import spawn

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo paths")


@pytest.fixture
def shim_off():
    """Run a test with the shim removed from this process, and put it back as it was."""
    was_active = cpu.is_active()
    cpu.remove()
    yield
    cpu.remove()
    if was_active:
        cpu.apply()


def test_inactive_when_cuda_is_available(shim_off, monkeypatch):
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    current_device, tracker = torch.cuda.current_device, mrandom.CudaRNGStatesTracker
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu.apply() is False and not cpu.is_active()
    assert torch.cuda.current_device is current_device and mrandom.CudaRNGStatesTracker is tracker
    assert schedules.torch is torch


@cpu_only
def test_apply_is_idempotent_and_reversible(shim_off):
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    original = torch.cuda.current_device
    assert cpu.apply() is True and cpu.apply() is True
    patched = torch.cuda.current_device
    assert cpu.apply() and torch.cuda.current_device is patched  # a second apply wraps nothing twice
    assert torch.cuda.current_device() == torch.device("cpu") and torch.cuda.synchronize() is None
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor  # everything else is the real torch
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")  # torch itself is not patched
    assert mrandom.CudaRNGStatesTracker.__name__ == "CpuRNGStatesTracker"
    cpu.remove()
    assert torch.cuda.current_device is original and schedules.torch is torch
    assert mrandom.CudaRNGStatesTracker.__name__ == "CudaRNGStatesTracker"


def rng_paths() -> dict:
    """Rank body (TP=2): tracker streams, dropout inside fork, and activation recompute with dropout."""
    from megatron.core import tensor_parallel

    from nemo_jstip.parallel.dist import init_parallel

    init_parallel(tp=2, seed=5)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        in_fork = torch.rand(4)
    default_unchanged = torch.equal(torch.get_rng_state(), before)
    outside = torch.rand(4)

    def block(x):
        with tracker.fork():
            return torch.nn.functional.dropout(x, 0.5) * 2

    x = torch.randn(16, requires_grad=True)
    states = tracker.get_states()
    states = {k: v.clone() for k, v in states.items()}
    block(x).pow(2).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    tracker.set_states(states)
    tensor_parallel.checkpoint(block, False, x).pow(2).sum().backward()
    return dict(in_fork=in_fork, outside=outside, default_unchanged=default_unchanged,
                recompute_same=torch.equal(x.grad, plain), dropped=int((plain == 0).sum()))


@cpu_only
def test_rng_tracker_dropout_and_recompute():
    r0, r1 = spawn(rng_paths, 2)
    assert not torch.equal(r0["in_fork"], r1["in_fork"])  # tensor-parallel stream: differs per TP rank
    assert torch.equal(r0["outside"], r1["outside"])  # default stream: the same on every TP rank
    assert r0["default_unchanged"] and r1["default_unchanged"]
    assert r0["recompute_same"] and r1["recompute_same"] and r0["dropped"] > 0


def broadcast() -> dict:
    """Rank body (TP=2): megatron's batch broadcast from TP rank 0 (``device="cuda"`` and ``.cuda()`` inside)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from nemo_jstip.parallel.dist import init_parallel

    init_parallel(tp=2)
    data = {"tokens": torch.arange(6).view(2, 3)} if ps.get_tensor_model_parallel_rank() == 0 else None
    return tensor_parallel.broadcast_data(["tokens"], data, torch.int64)


@cpu_only
def test_broadcast_data():
    for r in spawn(broadcast, 2):
        assert torch.equal(r["tokens"], torch.arange(6).view(2, 3))


def pipeline_step(pp: int) -> dict:
    """Rank body: one training step through megatron's schedule (1F1B at PP=2); HF weights, tied embeddings."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_jstip.modules.hf_import import llm_config_from_hf, load_hf_weights
    from nemo_jstip.modules.llm import build_llm, token_loss
    from nemo_jstip.parallel.dist import init_parallel
    from tests.modules.test_hf_import import VOCAB, tiny_hf

    init_parallel(pp=pp)
    hf = tiny_hf("tied")
    cfg = llm_config_from_hf(hf.config, layer_spec="local", train_mode="full")
    model = build_llm(cfg)
    load_hf_weights(model, hf, cfg)
    g = torch.Generator().manual_seed(2)
    data = iter([torch.randint(0, VOCAB, (2, 8), generator=g) for _ in range(3)])
    pos = torch.arange(8).expand(2, 8)

    def step(it, m):
        ids = next(it)
        out = m(ids, pos, None)
        return out, lambda o: (lambda l: (l, {"loss": l.detach()}))(token_loss(o, ids, VOCAB).mean())

    fb = get_forward_backward_func()
    losses = fb(forward_step_func=step, data_iterator=data, model=[model], num_microbatches=3, seq_length=8,
                micro_batch_size=2, forward_only=False)
    grads = {f"layer{layer.layer_number - 1}": layer.mlp.linear_fc2.weight.grad.clone() for layer in model.decoder.layers}
    return dict(schedule=fb.__name__, losses=[x["loss"].item() for x in losses], grads=grads)


@cpu_only
def test_pipeline_schedule_pp2_matches_pp1():
    (one,) = spawn(pipeline_step, 1, 1)
    first, last = spawn(pipeline_step, 2, 2)
    assert one["schedule"] == "forward_backward_no_pipelining" and len(one["losses"]) == 3
    assert last["schedule"] == "forward_backward_pipelining_without_interleaving" and not first["losses"]
    assert last["losses"] == pytest.approx(one["losses"], abs=1e-6)
    assert first["grads"].keys() == {"layer0"} and last["grads"].keys() == {"layer1"}
    for stage in (first, last):  # gradients came back through p2p to the first stage
        for k, v in stage["grads"].items():
            torch.testing.assert_close(v, one["grads"][k], atol=1e-6, rtol=1e-5)


def checkpoint_round(tp: int, path: str, save: bool) -> torch.Tensor:
    """Rank body: a LoRA model (non-zero adapters) saved with dist_checkpointing at TP=2, loaded at TP=1."""
    from megatron.core import dist_checkpointing

    from nemo_jstip.modules.llm import LLMConfig, build_llm, gather_logits
    from nemo_jstip.parallel.dist import init_parallel

    init_parallel(tp=tp, seed=3 if save else 4)  # the loading model starts from other weights
    cfg = LLMConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    vocab_size=250, layer_spec="local", train_mode="lora", lora_rank=4)
    model = build_llm(cfg)
    if save:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_b"):
                    p.normal_(0, 0.1)
        dist_checkpointing.save(model.sharded_state_dict(), path)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path), strict=False)
    ids = torch.randint(0, 250, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return gather_logits(model(ids, torch.arange(8).expand(2, 8), None), 250)


@cpu_only
def test_dist_checkpoint_tp2_save_tp1_load(tmp_path):
    saved = spawn(checkpoint_round, 2, 2, str(tmp_path), True)
    torch.testing.assert_close(saved[0], saved[1])
    (loaded,) = spawn(checkpoint_round, 1, 1, str(tmp_path), False)
    torch.testing.assert_close(loaded, saved[0], atol=1e-6, rtol=1e-5)


def test_foreach_multi_tensor_helpers(monkeypatch):
    """The shim replaces Megatron's per-tensor fallbacks (grad norm, clip scaling, main -> model weight copies)
    with torch._foreach ops: the same numbers."""
    from megatron.core.optimizer import clip_grads, optimizer

    for module, name in ((clip_grads, "l2_norm_impl"), (clip_grads, "multi_tensor_scale_impl"),
                         (optimizer, "multi_tensor_scale_impl"), (optimizer, "_multi_tensor_copy_this_to_that")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    cpu.foreach_multi_tensor()
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=g) for n in (3, 64, 1000)]
    norm, _ = clip_grads.l2_norm_impl(2048 * 32, None, [grads], False)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(torch.cat(grads)).reshape(1))
    clipped = [t.clone() for t in grads]
    clip_grads.multi_tensor_scale_impl(2048 * 32, None, [clipped, clipped], 0.5)  # in place, as clip_grads calls it
    for a, b in zip(clipped, grads):
        torch.testing.assert_close(a, 0.5 * b)
    model = [t.bfloat16() for t in grads]
    main = [torch.zeros_like(t) for t in grads]
    optimizer.multi_tensor_scale_impl(2048 * 32, None, [model, main], 1.0)  # bf16 -> fp32 copy
    for a, b in zip(main, model):
        assert a.dtype == torch.float32 and torch.equal(a, b.float())
    weights = [torch.zeros_like(t, dtype=torch.bfloat16) for t in grads]
    optimizer._multi_tensor_copy_this_to_that(grads, weights)  # fp32 main -> bf16 model weights
    for a, b in zip(weights, grads):
        assert torch.equal(a, b.bfloat16())
    scaled = [torch.zeros_like(t) for t in grads]
    optimizer.multi_tensor_scale_impl(2048 * 32, None, [grads, scaled], 2.0)
    for a, b in zip(scaled, grads):
        torch.testing.assert_close(a, 2.0 * b)


STEP_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "shim":
    from nemo_jstip.parallel import cpu
    assert cpu.apply()
float(torch.ones(30 << 18)[-1])  # one step's 30 MiB of activations, written and freed
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
float(torch.ones(20 << 18)[-1])  # the next step's 20 MiB
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@cpu_only
def test_a_step_reuses_the_memory_the_last_one_freed():
    """glibc alone unmaps the first step's memory and page-faults fresh pages in for the second (20 MiB = 5120 of
    4 KiB); with the shim the second step reuses what the first one freed."""
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    assert faults("plain") > 5_000  # the cost being removed exists on this machine
    assert faults("shim") < 100
