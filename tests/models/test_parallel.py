"""JSTIPModel under Megatron parallelism, on real gloo processes: TP, PP (1F1B) and TP x PP give the loss and the
gradients of one process; DP=2 with Megatron DDP equals one process over both ranks' data, for several AdamW steps.

Every rank imports the same tiny random HF Llama into its TP shard / PP stage (``load_hf_weights``) and loads the
same perception weights on the first stage; the batches are two real JSTIPDataset batches (asr, interleaved and
text items, different lengths). The single-process run over both batches as two microbatches is the reference for
every layout, the DP one included (per-token loss: the same tokens, the same normalisation).
"""

import re

import pytest
import torch

from nemo_jstip.parallel.dist import spawn

STEPS = 3  # optimizer steps of the DP comparison
LR = 1e-3


# ---------------------------------------------------------------------------------------------- rank bodies
def _build(setup_path, tp: int, pp: int, sequence_parallel: bool = False, split_over_tp: bool = True):
    from omegaconf import OmegaConf

    from nemo_jstip.models.jstip_model import JSTIPModel
    from nemo_jstip.modules.hf_import import load_hf_weights
    from nemo_jstip.parallel.dist import init_parallel

    torch.set_num_threads(1)  # the ranks share 2 cores with each other (and with other jobs)
    init_parallel(tp=tp, pp=pp, sequence_parallel=sequence_parallel)
    data = torch.load(setup_path, weights_only=False)
    cfg = OmegaConf.create(data["cfg"])
    cfg.perception.split_over_tp = split_over_tp
    model = JSTIPModel(cfg)  # no trainer: built at once in the current parallel state
    stage = model.stage
    load_hf_weights(stage.gpt, data["hf"], model.llm_cfg)
    if stage.perception is not None:
        stage.perception.load_state_dict(data["perception"])
    return model, data["batches"]


def _named(model, value) -> dict:
    """``value(param)`` for each trainable parameter, LLM names with global layer numbers (``llm.``) and
    perception names (``perception.``)."""
    stage = model.stage
    local_to_global = {i: layer.layer_number - 1 for i, layer in enumerate(stage.gpt.decoder.layers)}
    out = {}
    for name, p in stage.gpt.named_parameters():
        if p.requires_grad:
            name = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{local_to_global[int(m[1])]}.", name)
            out[f"llm.{name}"] = value(p).detach().clone()
    if stage.perception is not None:
        for name, p in stage.perception.named_parameters():
            if p.requires_grad:
                out[f"perception.{name}"] = value(p).detach().clone()
    return out


def pad_batch(batch: dict, multiple: int) -> dict:
    """``batch`` right-padded to a length that is a multiple of ``multiple``, as the dataset's ``pad_to_multiple``
    pads (padding has no loss; causal attention keeps it from the real positions)."""
    pad = -batch["input_ids"].shape[1] % multiple
    fill = {"input_ids": 0, "labels": -100, "loss_mask": 0, "audio_item": -1, "audio_frame": -1}
    return {k: torch.nn.functional.pad(v, (0, pad), value=fill[k]) if k in fill else v for k, v in batch.items()}


def run_layout(setup_path, tp: int, pp: int, split_batches: bool = False, steps: int = 0, only_first: bool = False,
               distributed_optimizer: bool = False, sequence_parallel: bool = False,
               split_over_tp: bool = True) -> dict:
    """Rank body: forward-only loss, one forward/backward (loss, main_grad), then ``steps`` AdamW steps as
    ``JSTIPModel.training_step`` takes them (the engine's, with Megatron's distributed optimizer if asked).
    ``split_batches``: data-parallel rank r trains on batch r only. ``only_first``: the first batch only, and on
    DP ranks > 0 an empty batch (all items dropped as bad input). ``sequence_parallel``: batches padded to a
    multiple of TP. ``split_over_tp``: the perception's switch (each TP rank encodes its share of the clips)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from omegaconf import OmegaConf

    model, batches = _build(setup_path, tp, pp, sequence_parallel, split_over_tp)
    if sequence_parallel:
        batches = [pad_batch(b, tp) for b in batches]
    perception = model.stage.perception
    encoded = []  # the number of clips this rank's encoder ran on, per forward
    if perception is not None:
        perception.encoder.register_forward_hook(lambda m, args, kwargs, out: encoded.append(out[0].shape[0]),
                                                 with_kwargs=True)
    if split_batches:
        batches = batches[ps.get_data_parallel_rank() :: ps.get_data_parallel_world_size()]
    if only_first:
        empty = {k: v[:0] if isinstance(v, torch.Tensor) else v for k, v in batches[0].items()}
        batches = [batches[0] if ps.get_data_parallel_rank() == 0 else empty]
    out = {
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
        "schedule": get_forward_backward_func().__name__,
        "eval": model.loss(batches),
    }
    model.setup_optimization(OmegaConf.create({"name": "adamw", "lr": LR, "weight_decay": 0.01,
                                               "use_distributed_optimizer": distributed_optimizer}))
    out["layout"] = model.engine.describe()
    norms = [m.weight for m in model.stage.gpt.modules() if isinstance(m, (torch.nn.RMSNorm, torch.nn.LayerNorm))]
    out["sequence_parallel"] = {"config": model.stage.gpt.config.sequence_parallel,
                                "norms": bool(norms) and all(getattr(w, "sequence_parallel", False) for w in norms)}
    model.engine.ddp.zero_grad_buffer()
    out["train"] = model.engine.forward_backward(batches, forward_only=False)
    out["grads"] = _named(model, lambda p: p.main_grad)
    out["grad_norm"] = model.engine.grad_norm()  # the engine's norm (clip_grads) and Megatron's of the same grads
    model.engine.optimizer.prepare_grads()
    out["megatron_grad_norm"] = model.engine.optimizer.get_grad_norm()
    model.engine.clip_grads(out["grad_norm"] / 2)
    out["clipped_norm"] = model.engine.grad_norm()
    model.engine.ddp.buffers[0].grad_data[0] = float("nan")  # the first stage's and every TP rank's first element
    try:
        model.engine.clip_grads(1.0)
    except FloatingPointError as e:
        out["nan_error"] = str(e)
    out["buffers"] = {k: v.clone() for k, v in perception.named_buffers() if "running" in k} if perception else {}

    out["steps"] = []
    for _ in range(steps):  # JSTIPModel.training_step without Lightning
        stats = model.engine.train_step(batches)
        out["steps"].append((stats["loss"], stats["grad_norm"]))
    out["weights"] = _named(model, lambda p: p.data)
    out["encoded_clips"], out["clips"] = encoded, [b["audio"].shape[0] for b in batches]
    opt = model.engine.optimizer.optimizer  # the torch optimizer inside Megatron's wrapper
    out["adam_numel"] = sum(s["exp_avg"].numel() for s in opt.state.values() if "exp_avg" in s)
    return out


# ---------------------------------------------------------------------------------------------- helpers
def _llm_cfg(setup_path):
    from nemo_jstip.modules.llm import LLMConfig

    cfg = torch.load(setup_path, weights_only=False)["cfg"]["llm"]
    return LLMConfig(**cfg)


def _hf_view(ranks: list[dict], key: str, llm_cfg) -> dict:
    """``key`` ("grads" / "weights") of all ranks of one model replica as one HF-named LLM dict plus the
    perception dict: TP shards are joined and padded vocabulary rows dropped (``megatron_to_hf``), PP stages merged."""
    from nemo_jstip.modules.hf_import import megatron_to_hf

    tp = 1 + max(r["tp_rank"] for r in ranks)
    shards = [{} for _ in range(tp)]
    perception = {}
    for r in ranks:
        for name, t in r[key].items():
            if name.startswith("llm."):
                shards[r["tp_rank"]][name[4:]] = t
            elif r["tp_rank"] == 0:
                perception[name] = t
    return {**{f"llm.{k}": v for k, v in megatron_to_hf(shards, llm_cfg).items()}, **perception}


def _max_rel_diff(got: dict, want: dict) -> tuple[float, str]:
    """max over tensors of max|got - want| / max(max|want|, 1e-2 * the largest |want| of all), with the worst
    tensor's name. The floor: a few parameters have a gradient that is zero in exact arithmetic (a conv bias right
    before BatchNorm, the attention key bias) and only rounding noise in fp32, which no two layouts share."""
    assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())[:8]
    floor = 1e-2 * max(v.abs().max().item() for v in want.values())
    worst = (0.0, "")
    for k in want:
        scale = max(want[k].abs().max().item(), floor)
        worst = max(worst, ((got[k] - want[k]).abs().max().item() / scale, k))
    return worst


@pytest.fixture(scope="module")
def reference(parallel_setup):
    """One process (TP=PP=DP=1), both batches as two microbatches, then STEPS optimizer steps."""
    (r,) = spawn(run_layout, 1, parallel_setup, 1, 1, steps=STEPS, timeout_s=120)  # starts the forkserver
    assert r["train"]["tokens"] > 0 and all(v.abs().sum() > 0 for k, v in r["grads"].items() if "perception" in k)
    losses = [loss for loss, _ in r["steps"]]
    assert losses == sorted(losses, reverse=True) and losses[0] == r["train"]["loss"]  # it trains
    return r


def test_clip_grads_is_megatrons_norm_and_refuses_nan(reference):
    """The engine clips on DDP's gradient buffers: the norm is Megatron's ``get_grad_norm`` of the same gradients,
    clipping to half of it halves it, and a NaN gradient raises instead of stepping."""
    r = reference
    assert r["grad_norm"] == pytest.approx(r["megatron_grad_norm"], rel=1e-6) and r["grad_norm"] > 0
    assert r["clipped_norm"] == pytest.approx(r["grad_norm"] / 2, rel=1e-5)
    assert "gradient norm is nan" in r["nan_error"]


@pytest.fixture(scope="module")
def runs(parallel_setup):
    """``runs(tp, pp, **run_layout_kwargs)``: the ranks' results of that layout with STEPS optimizer steps, each
    layout spawned once per module."""
    done = {}

    def get(tp: int, pp: int, **kwargs) -> list[dict]:
        key = (tp, pp, tuple(sorted(kwargs.items())))
        if key not in done:
            done[key] = spawn(run_layout, tp * pp, parallel_setup, tp, pp, steps=STEPS, timeout_s=90, **kwargs)
        return done[key]

    return get


def _grad_diff(ranks: list[dict], reference: dict, llm_cfg) -> tuple[float, float]:
    """max |grad - reference grad| over every LLM and perception parameter, and the largest reference gradient."""
    got, ref = _hf_view(ranks, "grads", llm_cfg), _hf_view([reference], "grads", llm_cfg)
    return (max((got[k] - ref[k]).abs().max().item() for k in ref), max(v.abs().max().item() for v in ref.values()))


# ---------------------------------------------------------------------------------------------- tests
LAYOUTS = {"tp2": (2, 1, {}), "pp2": (1, 2, {}), "tp2xpp2": (2, 2, {}),
           "tp2-sp": (2, 1, {"sequence_parallel": True}), "tp2xpp2-sp": (2, 2, {"sequence_parallel": True}),
           "tp2-whole-batch-encoder": (2, 1, {"split_over_tp": False})}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_model_parallel_matches_one_process(parallel_setup, reference, runs, name):
    """Same weights and batches: TP/PP/TPxPP (2 microbatches, 1F1B with PP), with and without sequence parallelism
    and with the speech encoder split over the TP ranks (the default) or not, give the single-process loss
    (training and forward-only, on every rank) and the same gradients of every LLM and perception parameter."""
    tp, pp, kwargs = LAYOUTS[name]
    ranks = runs(tp, pp, **kwargs)
    want = reference["train"]
    schedule = "forward_backward_pipelining_without_interleaving" if pp > 1 else "forward_backward_no_pipelining"
    for r in ranks:
        assert r["schedule"] == schedule
        assert r["train"]["tokens"] == want["tokens"] and r["eval"]["tokens"] == want["tokens"]
        assert r["train"]["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert r["eval"]["loss"] == pytest.approx(reference["eval"]["loss"], rel=1e-5)
        assert r["steps"][0][1] == pytest.approx(reference["steps"][0][1], rel=1e-5)  # global grad norm, once each
        assert r["grad_norm"] == pytest.approx(r["megatron_grad_norm"], rel=1e-6)
    assert {r["pp_rank"] for r in ranks if any(k.startswith("perception.") for k in r["grads"])} == {0}

    llm_cfg = _llm_cfg(parallel_setup)
    got, ref = _hf_view(ranks, "grads", llm_cfg), _hf_view([reference], "grads", llm_cfg)
    diff, grad_name = _max_rel_diff(got, ref)
    abs_diff, top = _grad_diff(ranks, reference, llm_cfg)
    print(f"{name}: loss {ranks[-1]['train']['loss']:.7f} vs {want['loss']:.7f}; max rel grad diff {diff:.2e} "
          f"({grad_name}); max |grad diff| {abs_diff:.2e}, largest grad {top:.2e}")
    assert diff < 1e-4, grad_name
    assert abs_diff <= 1e-5 * top, (abs_diff, top)
    perception = {k: v for k, v in got.items() if k.startswith("perception.")}
    assert len(perception) == sum(k.startswith("perception.") for k in ref)
    for r in ranks:  # TP ranks of the first stage hold the same (replicated) perception gradients
        for k, v in r["grads"].items():
            if k.startswith("perception."):
                assert torch.equal(v, got[k]), k


def test_sequence_parallel_trains_as_without(runs):
    """TP=2 with sequence parallelism: the layout line says so, Megatron's config has it, the local spec's norms are
    marked for its gradient sum, and STEPS AdamW steps log the losses and grad norms of TP=2 without it."""
    sp, plain = runs(2, 1, sequence_parallel=True), runs(2, 1)
    for r in sp:
        assert r["layout"] == "parallel layout: tp=2 pp=1 cp=1 dp=1 sequence_parallel=True distributed_optimizer=False"
        assert r["sequence_parallel"] == {"config": True, "norms": True}
    assert plain[0]["sequence_parallel"] == {"config": False, "norms": False}
    worst = 0.0
    for a, b in zip(sp, plain):
        assert len(a["steps"]) == STEPS
        for (loss_sp, norm_sp), (loss, norm) in zip(a["steps"], b["steps"]):
            assert loss_sp == pytest.approx(loss, rel=1e-5) and norm_sp == pytest.approx(norm, rel=1e-5)
            worst = max(worst, abs(loss_sp - loss) / loss)
    print(f"SP vs no SP over {STEPS} steps: max rel loss diff {worst:.1e}")


def test_encoder_runs_once_per_tp_group(runs, reference):
    """With ``perception.split_over_tp`` (the default) each TP rank encodes half of a batch's clips, and the
    encoder's BatchNorm running statistics stay those of one process (identical on both TP ranks); without it every
    rank encodes every clip."""
    split, whole = runs(2, 1), runs(2, 1, split_over_tp=False)
    for r in split:
        assert r["encoded_clips"] == [-(-n // 2) for n in r["clips"]] * (2 + STEPS)  # eval, forward-backward, steps
    for r in whole:
        assert r["encoded_clips"] == r["clips"] * (2 + STEPS)
    for k, want in reference["buffers"].items():
        torch.testing.assert_close(split[0]["buffers"][k], want, atol=1e-6, rtol=1e-5, msg=k)
        assert torch.equal(split[0]["buffers"][k], split[1]["buffers"][k]), k
    assert reference["buffers"]


def test_data_parallel_matches_one_process_on_both_batches(parallel_setup, reference):
    """DP=2, rank r on batch r: the DDP-reduced per-token gradients equal one process's over both batches (as two
    microbatches); after STEPS AdamW steps with grad clipping the weights are identical on both ranks and match the
    single-process run."""
    r0, r1 = spawn(run_layout, 2, parallel_setup, 1, 1, split_batches=True, steps=STEPS, timeout_s=60)
    assert (r0["dp_rank"], r1["dp_rank"]) == (0, 1)
    for r in (r0, r1):
        assert r["train"]["tokens"] == reference["train"]["tokens"]  # all-reduced over DP
        assert r["train"]["loss"] == pytest.approx(reference["train"]["loss"], rel=1e-5)
        assert r["eval"]["loss"] == pytest.approx(reference["eval"]["loss"], rel=1e-5)
    for k in r0["grads"]:  # all-reduced: the same on both ranks
        assert torch.equal(r0["grads"][k], r1["grads"][k]), k
    grad_diff, gname = _max_rel_diff(r0["grads"], reference["grads"])
    assert grad_diff < 1e-4, gname

    for (l0, n0), (l1, n1), (lr, nr) in zip(r0["steps"], r1["steps"], reference["steps"]):
        assert (l0, n0) == (l1, n1)
        assert l0 == pytest.approx(lr, rel=1e-5) and n0 == pytest.approx(nr, rel=1e-4)
    assert any(n > 0.5 for _, n in reference["steps"])  # clipping (max_grad_norm 0.5, conftest) was exercised
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    weight_diff = max((r0["weights"][k] - reference["weights"][k]).abs().max().item() for k in r0["weights"])
    print(f"dp=2: max rel grad diff {grad_diff:.2e} ({gname}); max |w_dp - w_1| after {STEPS} steps {weight_diff:.2e}")
    assert weight_diff < 1e-6


def test_distributed_optimizer_matches_plain_and_shards_adam_state(parallel_setup):
    """DP=2 with Megatron's DistributedOptimizer: the same losses and grad norms as DP=2 with the plain optimizer
    over STEPS steps, the same weights on both ranks, and each rank holds half of the Adam state."""
    plain = spawn(run_layout, 2, parallel_setup, 1, 1, split_batches=True, steps=STEPS, timeout_s=60)
    dist = spawn(run_layout, 2, parallel_setup, 1, 1, split_batches=True, steps=STEPS, distributed_optimizer=True,
                 timeout_s=60)
    assert all(r["layout"].endswith("dp=2 sequence_parallel=False distributed_optimizer=True") for r in dist)
    for r in dist + plain:  # the engine's norm on its DP shard of the buffers is Megatron's
        assert r["grad_norm"] == pytest.approx(r["megatron_grad_norm"], rel=1e-6)
    for d, p in zip(dist, plain):
        for (ld, nd), (lp, np_) in zip(d["steps"], p["steps"]):
            assert ld == pytest.approx(lp, rel=1e-4) and nd == pytest.approx(np_, rel=1e-4)
    # Adam turns a gradient that is zero in exact arithmetic (a conv bias before BatchNorm) into full steps of
    # rounding noise, which no two reduction orders share: such parameters are compared for equality across ranks only
    grads = plain[0]["grads"]
    top = max(g.abs().max().item() for g in grads.values())
    noise = {k for k, g in grads.items() if g.abs().max().item() < 1e-6 * top}
    assert len(noise) < 5, noise
    for k in dist[0]["weights"]:
        assert torch.equal(dist[0]["weights"][k], dist[1]["weights"][k]), k
        if k not in noise:
            torch.testing.assert_close(dist[0]["weights"][k], plain[0]["weights"][k], atol=1e-5, rtol=1e-4, msg=k)
    total = plain[0]["adam_numel"]
    assert sum(r["adam_numel"] for r in dist) == total and max(r["adam_numel"] for r in dist) < 0.51 * total


def test_data_parallel_rank_with_an_empty_batch(parallel_setup):
    """A DP rank whose batch lost every item to bad-input handling joins the step with nothing: no hang, and both
    ranks end where one process training on the other rank's batch alone ends."""
    r0, r1 = spawn(run_layout, 2, parallel_setup, 1, 1, steps=2, only_first=True, timeout_s=60)
    (one,) = spawn(run_layout, 1, parallel_setup, 1, 1, steps=2, only_first=True, timeout_s=60)
    assert r0["train"]["tokens"] == r1["train"]["tokens"] == one["train"]["tokens"] > 0
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
        torch.testing.assert_close(r0["weights"][k], one["weights"][k], atol=1e-6, rtol=1e-5)


def cp_split(setup_path) -> dict:
    """Rank body (CP=2): this rank's part of a batch padded to a multiple of 2 x CP."""
    from megatron.core import parallel_state as ps

    from nemo_jstip.parallel.engine import split_for_context_parallel
    from nemo_jstip.parallel.dist import init_parallel

    init_parallel(cp=2)
    batch = torch.load(setup_path, weights_only=False)["batches"][0]
    pad = -batch["input_ids"].shape[1] % 4
    batch = {k: torch.nn.functional.pad(v, (0, pad), value=-100 if k == "labels" else 0 if k != "audio_item" else -1)
             if k in ("input_ids", "labels", "loss_mask", "audio_item", "audio_frame") else v for k, v in batch.items()}
    return {"rank": ps.get_context_parallel_rank(), "full": batch, "part": split_for_context_parallel(batch)}


def test_context_parallel_split_is_megatrons_zigzag(parallel_setup):
    """CP=2 (gloo): each rank gets sequence chunks (r, 3 - r) of 4 for every sequence tensor, audio untouched, so
    the per-position splice and the loss see exactly the full batch between them. (The attention itself needs TE:
    the CP forward runs on GPUs only.)"""
    r0, r1 = spawn(cp_split, 2, parallel_setup)
    full = r0["full"]
    for key in ("input_ids", "labels", "loss_mask", "audio_item", "audio_frame"):
        chunks = full[key].chunk(4, dim=1)
        torch.testing.assert_close(r0["part"][key], torch.cat([chunks[0], chunks[3]], 1))
        torch.testing.assert_close(r1["part"][key], torch.cat([chunks[1], chunks[2]], 1))
    assert torch.equal(r0["part"]["audio"], full["audio"]) and torch.equal(r1["part"]["audio"], full["audio"])
    assert r0["part"]["loss_mask"].sum() + r1["part"]["loss_mask"].sum() == full["loss_mask"].sum()
