"""Decode a Lhotse manifest with a JSTIPModel and score it: the engine behind examples/jstip_eval.py.

Outputs (the contract other tools rely on, README "Evaluation"): ``metrics.json`` (``wer``, ``entity_accuracy``,
``num_utterances``, per-domain values, RTFx, and ``qa_accuracy``, ``qa_text_accuracy``, ``num_qa``),
``hypotheses.jsonl`` (``cut_id``, ``reference``, ``hypothesis``, plus domain and entities; QA cuts add ``question``,
``answers``, ``answer``, ``answer_text``) and ``report.md`` with its PNG plots (``nemo_jstip.plots``).

Zero-shot spoken QA (JSTIP.md, "How results are measured"): every cut is transcribed; cuts whose supervision
carries ``custom.answers`` (the corpus's ``qa_test`` set, whose audio speaks ``custom.question``) are also answered,
greedily, with one prompt template: once with the audio as ``{input}``, once with the transcript as text in its
place (the text-input upper bound; ``DatasetConfig.prompt_text_input``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nemo_jstip import plots
from nemo_jstip.metrics import entity_mentions, qa_correct, summarize
from nemo_jstip.modules.generate import decode_text, greedy_generate

QA_TEMPLATE = "Question: {input}\nAnswer:"


def _paths(manifest) -> list[str]:
    return [str(Path(p).resolve()) for p in ([manifest] if isinstance(manifest, (str, Path)) else manifest)]


def eval_loader(model, manifest, max_tokens: int = 8192, num_workers: int = 0, template: str = "{input}",
                text_input: bool = False):
    """Prompt-mode batches (left-padded; audio-first ASR prompts unless ``template`` / ``text_input`` say otherwise,
    see ``DatasetConfig``) of one manifest or a list, in order."""
    from megatron.core import parallel_state as ps

    from nemo_jstip.data.nemo_types import build_dataloader

    cfg = {
        "input_cfg": [{"type": "jstip_cuts", "cuts_path": _paths(manifest), "kind": "asr"}],
        "sampler": {"max_tokens": max_tokens, "num_buckets": 1, "shuffle": False, "seed": 0},
        "interleave": OmegaConf.to_container(model.cfg.get("interleave") or {}, resolve=True),
        "dataset": {"prompt": True, "prompt_template": template, "prompt_text_input": text_input},
        "loader": {"num_workers": num_workers},
    }
    return build_dataloader(cfg, model.tokenizer, model.frame_spec, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())


def _decode(model, loader, max_new_tokens: int):
    """``(batch, hypotheses)`` of every non-empty batch, greedy."""
    model.eval()
    tok = model.tokenizer
    for batch in loader:
        if batch["input_ids"].shape[0] == 0:
            continue
        batch = model._to_device(batch)
        ids = greedy_generate(model.stage, batch, max_new_tokens, tok.eos_token_id, tok.pad_token_id or tok.eos_token_id)
        yield batch, decode_text(tok, ids)


@torch.no_grad()
def transcribe(model, manifest: str, max_new_tokens: int = 256, max_tokens: int = 8192) -> tuple[list[dict], float]:
    """Greedy ASR of every cut; returns rows and the audio seconds per decoding second (RTFx)."""
    rows, audio_s, t0 = [], 0.0, time.perf_counter()
    for batch, hyps in _decode(model, eval_loader(model, manifest, max_tokens), max_new_tokens):
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


def qa_fields(cut) -> dict | None:
    """``question`` and ``answers`` of a QA cut (supervision custom, else cut custom), None for other cuts."""
    custom = {**(cut.custom or {}), **((cut.supervisions[0].custom or {}) if cut.supervisions else {})}
    if not custom.get("answers"):
        return None
    question = custom.get("question") or " ".join(s.text or "" for s in cut.supervisions)
    return {"question": question, "answers": [str(a) for a in custom["answers"]]}


def _first_line(text: str) -> str:
    """The answer is the first non-empty line: a base LLM goes on with the next "Question: ..." after it."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


@torch.no_grad()
def answer_questions(model, manifest, template: str = QA_TEMPLATE, max_new_tokens: int = 64,
                     max_tokens: int = 8192) -> dict[str, dict]:
    """Zero-shot QA of the cuts with answers: ``cut_id -> question, answers, answer (from the audio), answer_text
    (from the transcript as text)``. Only manifests holding a QA cut are decoded (their other cuts are skipped)."""
    from lhotse import CutSet

    qa, paths = {}, []
    for path in _paths(manifest):
        found = {c.id: f for c in CutSet.from_file(path) if (f := qa_fields(c))}
        qa.update(found)
        paths += [path] if found else []
    for key, text_input in (("answer", False), ("answer_text", True)):
        if not paths:
            break
        loader = eval_loader(model, paths, max_tokens, template=template, text_input=text_input)
        for batch, hyps in _decode(model, loader, max_new_tokens):
            for cut_id, hyp in zip(batch["cut_ids"], hyps):
                if cut_id in qa:
                    qa[cut_id][key] = _first_line(hyp)
    return qa


def evaluate(model, manifest, max_new_tokens: int = 256, max_tokens: int = 8192, qa_template: str = QA_TEMPLATE,
             qa_max_new_tokens: int = 64) -> tuple[list[dict], float]:
    """``transcribe`` every cut, then ``answer_questions``: QA cuts' rows get the QA fields; RTFx is the ASR's."""
    rows, rtfx = transcribe(model, manifest, max_new_tokens, max_tokens)
    qa = answer_questions(model, manifest, qa_template, qa_max_new_tokens, max_tokens)
    for r in rows:
        r.update(qa.get(r["cut_id"], {}))
    return rows, rtfx


def qa_rows(rows: list[dict]) -> list[dict]:
    """The QA rows with per-answer correctness, for the report."""
    return [r | {"correct": qa_correct(r.get("answer"), r["answers"]),
                 "text_correct": qa_correct(r.get("answer_text"), r["answers"])} for r in rows if r.get("answers")]


def write_outputs(rows: list[dict], rtfx: float, output_dir: str | Path, name: str = "",
                  log_dir: str | Path | None = None) -> dict:
    """metrics.json, hypotheses.jsonl, the plots and report.md; ``log_dir``: a training run's TensorBoard folder,
    whose loss curves join the plots."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = summarize(rows) | {"rtfx": rtfx}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    with open(out / "hypotheses.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    label = name or "model"
    figures = plots.write_plots({label: metrics}, out, {label: plots.read_scalars(log_dir)} if log_dir else None)
    (out / "report.md").write_text(report(metrics, entity_mentions(rows), name, qa_rows(rows), figures))
    return metrics


def _cell(text: str) -> str:
    """Generated text inside a Markdown table cell: a stray ``|`` would split the row."""
    return text.replace("|", "\\|")


def _judged(answer: str | None, correct: bool) -> str:
    return "-" if answer is None else f"{_cell(answer) or '(empty)'} {'(right)' if correct else '(wrong)'}"


def report(metrics: dict, mentions: list[dict], name: str = "", qa: list[dict] = (), figures: dict | None = None,
           max_mentions: int = 40) -> str:
    lines = [f"# Evaluation {name}".rstrip(), "", "| domain | utterances | WER % | entity acc % |", "|---|---|---|---|"]
    for d, m in metrics["domains"].items():
        lines.append(f"| {d} | {m['num_utterances']} | {plots.pct(m['wer'])} | {plots.pct(m['entity_accuracy'])} |")
    lines.append(
        f"| **all** | {metrics['num_utterances']} | {plots.pct(metrics['wer'])} | {plots.pct(metrics['entity_accuracy'])} |"
    )
    lines += ["", f"RTFx (audio seconds per decoding second): {metrics['rtfx']:.1f}", ""]
    if metrics["entity_accuracy_by_type"]:
        lines += ["| entity type | accuracy % |", "|---|---|"]
        lines += [f"| {t} | {plots.pct(a)} |" for t, a in metrics["entity_accuracy_by_type"].items()]
        lines += ["", "## Entity mentions (first misses)", "", "| cut | type | entity | hypothesis |", "|---|---|---|---|"]
        for m in [m for m in mentions if not m["correct"]][:max_mentions]:
            lines.append(f"| {m['cut_id']} | {m['type']} | {m['entity']} | {_cell(m['hypothesis'])} |")
    if metrics.get("num_qa"):
        n = metrics["num_qa"]
        lines += [""] * bool(lines[-1]) + ["## Zero-shot spoken QA", "", "| question given as | questions | accuracy % |",
                                           "|---|---|---|", f"| speech | {n} | {plots.pct(metrics['qa_accuracy'])} |",
                                           f"| text (upper bound) | {n} | {plots.pct(metrics['qa_text_accuracy'])} |", "",
                                           "| cut | question | answers | answer (speech) | answer (text) |",
                                           "|---|---|---|---|---|"]
        for r in list(qa)[:max_mentions]:
            lines.append(f"| {r['cut_id']} | {r['question']} | {' / '.join(r['answers'])} | "
                         f"{_judged(r.get('answer'), r['correct'])} | {_judged(r.get('answer_text'), r['text_correct'])} |")
    if figures:
        lines += [""] * bool(lines[-1]) + ["## Plots"] + [f"\n![{title}]({file})" for title, file in figures.items()]
    return "\n".join(lines) + "\n"
