"""Decode a Lhotse manifest with a JSTIPModel and score it: the engine behind examples/jstip_eval.py.

Outputs (the contract other tools rely on, README "Evaluation"): ``metrics.json`` (``wer``, ``entity_accuracy``,
``num_utterances``, per-domain values, RTFx), ``hypotheses.jsonl`` (``cut_id``, ``reference``, ``hypothesis``, plus
domain and entities) and ``report.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nemo_jstip.metrics import entity_mentions, summarize
from nemo_jstip.modules.generate import decode_text, greedy_generate


def eval_loader(model, manifest, max_tokens: int = 8192, num_workers: int = 0):
    """Prompt-mode batches (audio-first ASR prompts, left-padded) of one manifest or a list, in order."""
    from megatron.core import parallel_state as ps

    from nemo_jstip.data.nemo_types import build_dataloader

    paths = [manifest] if isinstance(manifest, (str, Path)) else list(manifest)
    cfg = {
        "input_cfg": [{"type": "jstip_cuts", "cuts_path": [str(Path(p).resolve()) for p in paths], "kind": "asr"}],
        "sampler": {"max_tokens": max_tokens, "num_buckets": 1, "shuffle": False, "seed": 0},
        "interleave": OmegaConf.to_container(model.cfg.get("interleave") or {}, resolve=True),
        "dataset": {"prompt": True},
        "loader": {"num_workers": num_workers},
    }
    return build_dataloader(cfg, model.tokenizer, model.frame_spec, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())


@torch.no_grad()
def transcribe(model, manifest: str, max_new_tokens: int = 96, max_tokens: int = 8192) -> tuple[list[dict], float]:
    """Greedy ASR of every cut; returns rows and the audio seconds per decoding second (RTFx)."""
    model.eval()
    tok = model.tokenizer
    rows, audio_s, t0 = [], 0.0, time.perf_counter()
    for batch in eval_loader(model, manifest, max_tokens):
        if batch["input_ids"].shape[0] == 0:
            continue
        batch = model._to_device(batch)
        ids = greedy_generate(model.stage, batch, max_new_tokens, tok.eos_token_id, tok.pad_token_id or tok.eos_token_id)
        hyps = decode_text(tok, ids)
        audio_s += float(batch["audio_lens"].sum()) / model.frame_spec.sample_rate
        for i, cut_id in enumerate(batch["cut_ids"]):
            rows.append(
                {
                    "cut_id": cut_id,
                    "reference": batch["texts"][i],
                    "hypothesis": hyps[i],
                    "domain": batch["domains"][i],
                    "entities": batch["entities"][i],
                }
            )
    return rows, audio_s / max(time.perf_counter() - t0, 1e-9)


def write_outputs(rows: list[dict], rtfx: float, output_dir: str | Path, name: str = "") -> dict:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = summarize(rows) | {"rtfx": rtfx}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    with open(out / "hypotheses.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (out / "report.md").write_text(report(metrics, entity_mentions(rows), name))
    return metrics


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def report(metrics: dict, mentions: list[dict], name: str = "", max_mentions: int = 40) -> str:
    lines = [f"# Evaluation {name}".rstrip(), "", "| domain | utterances | WER % | entity acc % |", "|---|---|---|---|"]
    for d, m in metrics["domains"].items():
        lines.append(f"| {d} | {m['num_utterances']} | {_pct(m['wer'])} | {_pct(m['entity_accuracy'])} |")
    lines.append(
        f"| **all** | {metrics['num_utterances']} | {_pct(metrics['wer'])} | {_pct(metrics['entity_accuracy'])} |"
    )
    lines += ["", f"RTFx (audio seconds per decoding second): {metrics['rtfx']:.1f}", ""]
    if metrics["entity_accuracy_by_type"]:
        lines += ["| entity type | accuracy % |", "|---|---|"]
        lines += [f"| {t} | {_pct(a)} |" for t, a in metrics["entity_accuracy_by_type"].items()]
        lines += ["", "## Entity mentions (first misses)", "", "| cut | type | entity | hypothesis |", "|---|---|---|---|"]
        for m in [m for m in mentions if not m["correct"]][:max_mentions]:
            lines.append(f"| {m['cut_id']} | {m['type']} | {m['entity']} | {m['hypothesis']} |")
    return "\n".join(lines) + "\n"
