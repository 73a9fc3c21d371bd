"""Packed batches (``sampler.pack``): several examples per row with a block-causal mask give the loss and the
gradients of the same examples one per row, in one process and under TP (with sequence parallelism) and PP, on
real gloo processes."""

import pytest
import torch

from nemo_jstip.parallel.dist import spawn
from tests.models.test_parallel import _build, _hf_view, _llm_cfg, _named, pad_batch


def _pad(batch: dict, multiple: int) -> dict:
    out = pad_batch(batch, multiple)
    if "segment_ids" in batch:
        pad = out["input_ids"].shape[1] - batch["segment_ids"].shape[1]
        out["segment_ids"] = torch.nn.functional.pad(batch["segment_ids"], (0, pad), value=-1)
    return out


def run_packed(setup_path, tp: int, pp: int, sequence_parallel: bool = False) -> dict:
    """Rank body: one forward/backward over the setup's two batches, unpacked and packed (the same items)."""
    from megatron.core import parallel_state as ps
    from omegaconf import OmegaConf

    model, _ = _build(setup_path, tp, pp, sequence_parallel)
    data = torch.load(setup_path, weights_only=False)
    model.setup_optimization(OmegaConf.create({"name": "adamw", "lr": 1e-3}))
    out = {"tp_rank": ps.get_tensor_model_parallel_rank(), "sdpa_masks": 0}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, attn_mask=None, **kwargs):  # the block mask takes the fused path, not Megatron's softmax
        out["sdpa_masks"] += attn_mask is not None
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = counting
    for key in ("batches", "packed_batches"):
        batches = [_pad(b, tp) for b in data[key]] if sequence_parallel else data[key]
        model.engine.ddp.zero_grad_buffer()
        out[key] = model.engine.forward_backward(batches, forward_only=False)
        out[f"{key}_grads"] = _named(model, lambda p: p.main_grad)
        out[f"{key}_rows"] = [b["input_ids"].shape[0] for b in batches]
    return out


@pytest.mark.parametrize("tp, pp, sp", [(1, 1, False), (2, 1, True), (1, 2, False)], ids=["tp1", "tp2-sp", "pp2"])
def test_packed_equals_unpacked(parallel_setup, tp, pp, sp):
    ranks = spawn(run_packed, tp * pp, parallel_setup, tp, pp, sequence_parallel=sp, timeout_s=120)
    llm_cfg = _llm_cfg(parallel_setup)
    for r in ranks:
        assert sum(r["packed_batches_rows"]) < sum(r["batches_rows"])  # fewer, fuller rows
        assert r["sdpa_masks"] > 0
        assert r["packed_batches"]["tokens"] == r["batches"]["tokens"]
        assert r["packed_batches"]["loss"] == pytest.approx(r["batches"]["loss"], rel=1e-5)
    got = _hf_view(ranks, "packed_batches_grads", llm_cfg)
    want = _hf_view(ranks, "batches_grads", llm_cfg)
    top = max(v.abs().max().item() for v in want.values())
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"tp={tp} pp={pp} sp={sp}: loss {ranks[-1]['packed_batches']['loss']:.7f} vs "
          f"{ranks[-1]['batches']['loss']:.7f}; max grad diff {diff:.2e} of {top:.2e}")
    assert diff <= 1e-5 * top
