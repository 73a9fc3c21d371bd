"""CPU training-step time of our tiny JSTIPModel next to NeMo's speechlm2 SALM, same sizes, same batch.

Why: SALM (plain LightningModule + HF Llama) is the reference speech-LLM of NeMo 3.0; our Megatron-based model
should not train slower than it at equal size. One process builds both and times them alternately:

- JSTIP: ``conf/jstip_tiny.yaml`` ``model`` section (NeMo mel preprocessor + ConformerEncoder + MLP adapter,
  Megatron GPT, local layer spec + the CPU shim), one step = ``model.engine.train_step`` (Megatron schedule,
  Megatron DDP, the engine's global-norm clipping, Megatron's optimizer wrapper around AdamW), as ``training_step``
  does.
- SALM: built offline (``pretrained_weights: False``, a local HF ``LlamaConfig`` folder, a local tokenizer) with
  the SAME preprocessor/encoder kwargs, ``IdentityConnector`` and ``perception.proj`` replaced by a copy of our
  adapter MLP; a ``LlamaForCausalLM`` with the yaml's layers/hidden/ffn/heads/kv-groups. One step =
  ``SALM.training_step`` called directly (no Trainer; its ``self.log`` calls are no-ops), ``loss.backward()``,
  ``clip_grad_norm_``, AdamW (the same hyper-parameters).
- Each optimizer as its recipe builds it: ours torch's fused AdamW (``conf/jstip_tiny.yaml``: ``fused: true``),
  SALM's ``foreach`` AdamW (NeMo's ``examples/speechlm2/conf/salm.yaml``: ``foreach: true``).
- Same process, so the same allocator: building JSTIP on the CPU applies ``parallel/cpu.py``, whose
  ``keep_freed_memory`` setting then holds for SALM's steps too; the table's page faults per step show it.
- Same function: SALM's LLM weights are imported into ours (``load_hf_weights``), encoder and adapter weights are
  copied, so the eval-mode losses of the two must agree; the script checks this before timing.
- Same batch: ASR examples from our dataset (``BOS <speech_start> <audio> x T <speech_end> transcript EOS``, loss on
  transcript + EOS). SALM gets the same ids with the T placeholders collapsed to its one audio-locator token plus
  one trailing pad (SALM drops the last position), so both LLMs see B x L positions and the same loss targets.
  Differences that remain are the designs: ours right-pads with no attention mask (causal SDPA), SALM left-pads
  and passes a padding mask to HF SDPA; ours splices with one gather, SALM with a per-row Python loop; ours runs
  the output layer and the loss on the labelled positions only, SALM on every position; Megatron pads the logit
  layer to a multiple of 128 rows.

    nice -n 5 .venv/bin/python benchmarks/bench_salm.py --steps 60 --warmup 5 --batch 8 --seconds 4 --profile
    .venv/bin/python benchmarks/bench_salm.py --corpus '' --steps 3 --warmup 1   # synthetic audio/text (fresh clone)
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # a CPU benchmark: the model picks CUDA whenever it is visible

import torch  # noqa: E402

PAD = "<|pad|>"  # SALM's padding token: ours pads with EOS, which SALM would drop from targets and attention


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per system")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per system")
    p.add_argument("--batch", type=int, default=8, help="utterances per step")
    p.add_argument("--seconds", type=float, default=4.0, help="audio length (corpus: the cuts closest to it)")
    p.add_argument("--corpus", default="data/demo_corpus", help="corpus dir with general_train_cuts.jsonl; '' or a "
                   "missing dir: random audio and text")
    p.add_argument("--config", default="conf/jstip_tiny.yaml")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--profile", action="store_true", help="also time perception / LLM / optimizer parts")
    p.add_argument("--torch-profile", type=int, default=0, metavar="N",
                   help="also run N steps of each under torch.profiler and print the top operators by self CPU time")
    return p.parse_args(argv)


def minor_faults() -> int:
    """This process's minor page faults so far: memory the allocator got afresh from the kernel, 4 KiB each."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def load_cuts(a, tmp: Path):
    """B cuts: the corpus's cuts closest to --seconds, or random audio + random words written to ``tmp``."""
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

    manifest = Path(a.corpus) / "general_train_cuts.jsonl" if a.corpus else None
    if manifest is not None and manifest.exists():
        from functools import partial

        from nemo.collections.common.data.lhotse.cutset import resolve_relative_paths

        cuts = CutSet.from_file(manifest).map(partial(resolve_relative_paths, manifest_path=str(manifest)))
        return sorted(cuts, key=lambda c: (abs(c.duration - a.seconds), c.id))[: a.batch], "corpus " + str(manifest)
    import soundfile as sf

    g = torch.Generator().manual_seed(0)
    letters, out = "abcdefghijklmnopqrstuvwxyz", []
    n_words = max(1, round(2.5 * a.seconds))  # ~150 words per minute
    for i in range(a.batch):
        path = tmp / f"synth{i}.wav"
        sf.write(path, (0.1 * torch.randn(int(a.seconds * 16000), generator=g)).numpy(), 16000)
        rec = Recording.from_file(path, recording_id=f"synth{i}")
        words = ["".join(letters[j] for j in torch.randint(0, 26, (int(n),), generator=g))
                 for n in torch.randint(2, 9, (n_words,), generator=g)]
        sup = SupervisionSegment(f"synth{i}", rec.id, 0.0, rec.duration, text=" ".join(words))
        out.append(MonoCut(f"synth{i}", 0.0, rec.duration, 0, recording=rec, supervisions=[sup]))
    return out, "synthetic (random audio, random words)"


def tokenizer_dir(a, cuts, tmp: Path) -> str:
    for d in (Path(a.corpus) / "tokenizer" if a.corpus else None, ROOT / "data/demo_corpus/tokenizer"):
        if d is not None and (d / "tokenizer.json").exists():
            return str(d)
    from nemo_jstip.prep.tokenizer import train_tokenizer

    texts = [c.supervisions[0].text for c in cuts] * 20
    train_tokenizer(texts, 300, tmp / "tokenizer")
    return str(tmp / "tokenizer")


def build_jstip(a, tok_dir: str):
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from nemo_jstip.data.examples import add_special_tokens
    from nemo_jstip.data.interleave import InterleaveConfig
    from nemo_jstip.models.jstip_model import JSTIPModel

    full = OmegaConf.load(ROOT / a.config)
    model_cfg = OmegaConf.to_container(full, resolve=True)["model"]  # resolves output_size: ${model.llm.hidden_size}
    for key in ("train_ds", "validation_ds", "test_ds"):
        model_cfg.pop(key, None)
    model_cfg["tokenizer"] = {"path": tok_dir}
    optim = model_cfg.pop("optim")  # the benchmark sets the optimizer up itself, without the scheduler
    tok = AutoTokenizer.from_pretrained(tok_dir)
    add_special_tokens(tok, InterleaveConfig(**model_cfg.get("interleave", {})))
    model_cfg["llm"]["vocab_size"] = len(tok) + 1  # + SALM's pad token, so both softmaxes span the same vocab
    torch.manual_seed(0)
    model = JSTIPModel(OmegaConf.create(model_cfg))
    return model, {**model_cfg, "optim": optim}


def build_salm(jstip, model_cfg: dict, tmp: Path):
    """SALM with the same perception kwargs and LLM sizes; then our LLM/perception take its weights."""
    import transformers as T
    from nemo.collections.speechlm2.models import SALM

    from nemo_jstip.data.examples import AUDIO_TOKEN
    from nemo_jstip.modules.hf_import import load_hf_weights

    tok = copy.deepcopy(jstip.tokenizer)
    tok.add_special_tokens({"pad_token": PAD})
    tok.save_pretrained(str(tmp / "salm_tok"))
    llm, V = model_cfg["llm"], jstip.llm_cfg.vocab_size
    assert len(tok) == V, (len(tok), V)
    hf_cfg = T.LlamaConfig(
        vocab_size=V, hidden_size=llm["hidden_size"], intermediate_size=llm["ffn_hidden_size"],
        num_hidden_layers=llm["num_layers"], num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm.get("num_query_groups") or llm["num_attention_heads"],
        max_position_embeddings=llm["max_sequence_length"], rms_norm_eps=jstip.llm_cfg.norm_eps,
        tie_word_embeddings=jstip.llm_cfg.tie_embeddings,
    )
    hf_cfg.save_pretrained(str(tmp / "salm_llm"))
    ours = jstip.stage.perception
    enc = {"_target_": "nemo.collections.asr.modules.ConformerEncoder", **_plain(ours.cfg.encoder)}
    enc.setdefault("sync_max_audio_length", False)  # as SpeechPerception does: no all-reduce per forward
    pre = {"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
           **_plain(ours.cfg.preprocessor)}
    # SALM runs its parameter-less preprocessor in eval mode (no dither) while training; ours dithers as NeMo's
    # ASR models do: off here, so that both steps compute the same
    ours.preprocessor.featurizer.dither = 0.0
    cfg = {
        "pretrained_llm": str(tmp / "salm_llm"), "tokenizer_path": str(tmp / "salm_tok"),
        "pretrained_weights": False, "audio_locator_tag": AUDIO_TOKEN, "prompt_format": "plain",
        "perception": {"preprocessor": pre, "encoder": enc, "output_dim": llm["hidden_size"],
                       "modality_adapter": {"_target_": "nemo.collections.speechlm2.modules.perception."
                                                       "IdentityConnector"}},
    }
    torch.manual_seed(1)
    salm = SALM(cfg).train()
    salm.perception.proj = copy.deepcopy(ours.adapter.net)  # our adapter MLP (stack 1), same weights
    salm.perception.encoder.load_state_dict(ours.encoder.state_dict())
    salm.perception.preprocessor.load_state_dict(ours.preprocessor.state_dict())
    hf_sd = {**salm.llm.state_dict(), "model.embed_tokens.weight": salm.embed_tokens.weight}
    load_hf_weights(jstip.stage.gpt, hf_sd, jstip.llm_cfg)
    assert salm.audio_locator_tag_id == jstip.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    return salm


def _plain(cfg) -> dict:
    """A DictConfig section as a plain dict."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def jstip_batch(model, cuts) -> dict:
    from nemo_jstip.data.dataset import JSTIPDataset
    from nemo_jstip.data.examples import ExampleBuilder

    ds = JSTIPDataset(ExampleBuilder(model.tokenizer, model.frame_spec, model.interleave_cfg))
    b = ds[cuts]
    assert b["input_ids"].shape[0] == len(cuts) and set(b["kinds"]) == {"asr"}, b["problems"]
    return {k: v for k, v in b.items() if isinstance(v, torch.Tensor)}


def salm_batch(jb: dict, audio_id: int, pad_id: int) -> dict:
    """SALM's batch (audios, audio_lens, input_ids, loss_mask) with the same content as our batch ``jb``."""
    rows, masks = [], []
    for b in range(jb["input_ids"].shape[0]):
        n = int(jb["seq_lens"][b])
        ids = jb["input_ids"][b, :n]
        target = torch.zeros(n, dtype=torch.bool)
        target[1:] = jb["labels"][b, : n - 1] != -100  # ours: labels[t] = ids[t+1]; SALM: mask on the target id
        keep = torch.ones(n, dtype=torch.bool)
        keep[1:] = ~((ids[1:] == audio_id) & (ids[:-1] == audio_id))  # T placeholders -> one locator
        rows.append(torch.cat([ids[keep], torch.tensor([pad_id])]))
        masks.append(torch.cat([target[keep], torch.tensor([False])]))
    L = max(len(r) for r in rows)  # SALM's collate left-pads
    input_ids = torch.full((len(rows), L), pad_id)
    loss_mask = torch.zeros((len(rows), L), dtype=torch.bool)
    for b, (r, m) in enumerate(zip(rows, masks)):
        input_ids[b, L - len(r):], loss_mask[b, L - len(r):] = r, m
    return {"audios": jb["audio"], "audio_lens": jb["audio_lens"], "input_ids": input_ids, "loss_mask": loss_mask}


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_salm_"))  # tokenizer, HF config, synthetic wavs
    atexit.register(shutil.rmtree, tmp, True)
    cuts, source = load_cuts(a, tmp)
    tok_dir = tokenizer_dir(a, cuts, tmp)
    model, model_cfg = build_jstip(a, tok_dir)
    salm = build_salm(model, model_cfg, tmp)
    jb = jstip_batch(model, cuts)
    sb = salm_batch(jb, salm.audio_locator_tag_id, salm.text_pad_id)
    max_norm = float(model_cfg.get("max_grad_norm") or 1.0)

    # the same positions and targets reach both LLMs, and the two models compute the same function (eval mode)
    model.eval()
    salm.eval()
    with torch.no_grad():
        inputs = salm.prepare_inputs(sb)
        loss_j = model.loss([jb])["loss"]
        loss_s = salm.training_step(sb, 0)["loss"].item()
    model.train()
    salm.train()
    assert tuple(inputs["input_embeds"].shape[:2]) == tuple(jb["input_ids"].shape), (inputs["input_embeds"].shape,
                                                                                     jb["input_ids"].shape)
    assert int((inputs["target_ids"] != -100).sum()) == int(jb["loss_mask"].sum())
    assert abs(loss_j - loss_s) < 1e-3 * max(1.0, abs(loss_j)), f"eval losses differ: JSTIP {loss_j} SALM {loss_s}"

    o = model_cfg["optim"]
    adamw = dict(lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
    from omegaconf import OmegaConf

    model.setup_optimization(OmegaConf.create({k: v for k, v in o.items() if k != "sched"}))
    params_s = [p for p in salm.parameters() if p.requires_grad]
    opt_s = torch.optim.AdamW(params_s, **adamw, foreach=True)

    def step_jstip() -> float:
        return model.engine.train_step([jb])["loss"]

    def step_salm() -> float:
        opt_s.zero_grad(set_to_none=True)
        loss = salm.training_step(sb, 0)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_s, max_norm)
        opt_s.step()
        return loss.item()

    warnings.filterwarnings("ignore", message=".*self.log.*")  # SALM logs through a Trainer we do not have
    steps = {"JSTIP": step_jstip, "SALM": step_salm}
    times, losses, faults = {k: [] for k in steps}, {k: [] for k in steps}, {k: [] for k in steps}
    load0 = os.getloadavg()  # the cores may be shared: the 1-minute load average says how busy they were
    for i in range(a.warmup + a.steps):  # alternate, and swap the order every step: shared-core noise hits both
        for name in (("JSTIP", "SALM") if i % 2 == 0 else ("SALM", "JSTIP")):
            f0, t0 = minor_faults(), time.perf_counter()
            losses[name].append(steps[name]())
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
                faults[name].append(minor_faults() - f0)

    B, L = jb["input_ids"].shape
    print(f"\nbatch: {source}; {B} utterances, {jb['audio_lens'].sum().item() / 16000:.1f} s audio, "
          f"{B} x {L} LLM positions, {int(jb['loss_mask'].sum())} loss tokens; threads {torch.get_num_threads()}; "
          f"torch {torch.__version__}; {a.warmup} warmup + {a.steps} timed steps each, alternating; load average "
          f"{load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after timing")
    print(f"eval loss at init (same weights): JSTIP {loss_j:.5f}  SALM {loss_s:.5f}; last train loss: "
          f"JSTIP {losses['JSTIP'][-1]:.4f}  SALM {losses['SALM'][-1]:.4f}\n")
    enc = {"JSTIP": n_params(model.stage.perception), "SALM": n_params(salm.perception)}
    llm = {"JSTIP": n_params(model.stage.gpt), "SALM": n_params(salm.llm) + n_params(salm.embed_tokens)}
    mean = {k: statistics.mean(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| system | params enc+adapter / LLM / total | tokens per step | page faults per step | mean step s | std s "
          "| median s | min s | SALM/JSTIP mean (median, min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in steps:
        ratio = (f"{mean['SALM'] / mean['JSTIP']:.2f} ({med['SALM'] / med['JSTIP']:.2f}, "
                 f"{min(times['SALM']) / min(times['JSTIP']):.2f})") if k == "SALM" else "1"
        std = statistics.stdev(times[k]) if len(times[k]) > 1 else 0.0
        print(f"| {k} | {enc[k] / 1e6:.3f}M / {llm[k] / 1e6:.3f}M / {(enc[k] + llm[k]) / 1e6:.3f}M | {B * L} | "
              f"{statistics.mean(faults[k]):.0f} | {mean[k]:.4f} | {std:.4f} | {med[k]:.4f} | {min(times[k]):.4f} | "
              f"{ratio} |")
    if a.profile:
        profile(model, salm, jb, sb, opt_s, params_s, max_norm)
    if a.torch_profile:
        torch_profile(steps, a.torch_profile)


def torch_profile(steps: dict, n: int) -> None:
    """``n`` steps of each system under torch.profiler: where the CPU time goes, operator by operator."""
    for name, step in steps.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                step()
        print(f"\n{name}: {n} steps under torch.profiler, top operators by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


def profile(model, salm, jb, sb, opt_s, params_s, max_norm, n: int = 20):
    """Median (min) seconds of the parts of a step, each part timed alternately for the two systems (n times)."""
    from nemo_jstip.modules.llm import token_loss

    B, L = jb["input_ids"].shape
    H = model.llm_cfg.hidden_size
    x_j, x_s, mask = torch.randn(L, B, H), torch.randn(B, L, H), torch.ones(B, L, dtype=torch.bool)
    V, V_pad = model.llm_cfg.vocab_size, model.stage.gpt.output_layer.weight.shape[0]
    logits_j = torch.randn(B, L, V_pad, requires_grad=True)
    logits_s = torch.randn(B * L, V, requires_grad=True)
    labels = jb["labels"]

    def opt_step_j():  # the engine's step after the backward: clip on the gradient buffers, Megatron's wrapper steps
        model.engine.clip_grads(max_norm)
        model.engine.optimizer.step()

    def opt_step_s():
        torch.nn.utils.clip_grad_norm_(params_s, max_norm)
        opt_s.step()

    parts = {
        "perception fwd+bwd": (
            lambda: model.stage.perception(jb["audio"], jb["audio_lens"])[0].sum().backward(),
            lambda: salm.perception(input_signal=sb["audios"],
                                    input_signal_length=sb["audio_lens"])[0].sum().backward()),
        "LLM fwd+bwd on random embeddings": (
            lambda: model.stage.gpt(input_ids=None, position_ids=None, attention_mask=None,
                                    decoder_input=x_j).float().sum().backward(),
            lambda: salm.llm(inputs_embeds=x_s, attention_mask=mask)["logits"].sum().backward()),
        "cross-entropy fwd+bwd on random logits": (
            lambda: (token_loss(logits_j.clone(), labels, V) * jb["loss_mask"]).sum().backward(),
            lambda: torch.nn.functional.cross_entropy(logits_s.clone(), labels.flatten(), reduction="sum",
                                                      ignore_index=-100).backward()),
        "perception fwd + splice (no grad)": (
            lambda: model.stage.embed(jb),
            lambda: salm.prepare_inputs(sb)),
        "whole forward (no grad)": (
            lambda: model.stage(jb),
            lambda: salm.training_step(sb, 0)),
        "whole fwd+bwd (model's own path)": (
            lambda: model.engine.forward_backward([jb], forward_only=False),
            lambda: salm.training_step(sb, 0)["loss"].backward()),
        "clip + AdamW step": (opt_step_j, opt_step_s),
    }
    print(f"\n| part: median (min) s of {n} | JSTIP | SALM |\n|---|---|---|")
    for name, (fj, fs) in parts.items():
        tj, ts = [], []
        ctx = torch.no_grad() if "no grad" in name else contextlib.nullcontext()
        with ctx:
            for i in range(n + 1):
                for f, t in ((fj, tj), (fs, ts)) if i % 2 == 0 else ((fs, ts), (fj, tj)):
                    t0 = time.perf_counter()
                    f()
                    if i:
                        t.append(time.perf_counter() - t0)
        print(f"| {name} | {statistics.median(tj):.4f} ({min(tj):.4f}) | {statistics.median(ts):.4f} ({min(ts):.4f}) |")


if __name__ == "__main__":
    main()
