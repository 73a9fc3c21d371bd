"""Decode a Lhotse manifest with a JSTIPModel and score it: the engine behind examples/jstip_eval.py.

Outputs (the contract other tools rely on, README "Evaluation"): ``metrics.json`` (``wer``, ``entity_accuracy``,
``num_utterances``, per-domain values, RTFx, ``qa_accuracy``, ``qa_text_accuracy``, ``num_qa``, and the account of
every cut: ``num_cuts``, ``num_skipped``, ``skipped`` {cut id: reason}, ``wer_covers``), ``hypotheses.jsonl``
(``cut_id``, ``reference``, ``hypothesis``, plus domain and entities; QA cuts add ``question``, ``answers``,
``answer``, ``answer_text``) and ``report.md`` with its PNG plots (``nemo_jstip.plots``).

Every cut is accounted for: one the dataset drops (missing or unreadable audio, too short, ...: the codes of
``nemo_jstip.data.dataset.PROBLEMS``) or the sampler drops (costlier than ``max_tokens``) is listed in ``skipped``
with its reason, and WER covers the decoded cuts that have a reference transcript (``wer_covers``). The annotations
the scores read (entities, domain, QA answers) are checked for the whole manifest before anything is decoded, and
hypotheses are appended to ``hypotheses.jsonl`` batch by batch (one ``hypotheses.dp<rank>.jsonl`` per data-parallel
replica), so a crash loses nothing already decoded; the finished evaluation rewrites it whole, in manifest order.

Data parallel: with ``world_size = TP x DP`` processes each DP replica decodes its share of the batches (the
sampler's DP split); the rows are gathered and rank 0 writes the one set of outputs.

Zero-shot spoken QA (docs/method.md, "How results are measured"): every cut is transcribed; cuts whose supervision
carries ``custom.answers`` (the corpus's ``qa_test`` set, whose audio speaks ``custom.question``) are also answered,
greedily, with one prompt template: once with the audio as ``{input}``, once with the transcript as text in its
place (the text-input upper bound; ``DatasetConfig.prompt_text_input``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from lhotse import CutSet
from omegaconf import OmegaConf

from nemo_jstip import plots
from nemo_jstip.data.manifest import ManifestCuts
from nemo_jstip.metrics import entity_mentions, entity_records, qa_correct, summarize
from nemo_jstip.modules.generate import decode_text, greedy_generate

QA_TEMPLATE = "Question: {input}\nAnswer:"


def _paths(manifest) -> list[str]:
    return [str(Path(p).resolve()) for p in ([manifest] if isinstance(manifest, (str, Path)) else manifest)]


def _cuts(path: str):
    return ManifestCuts(path) if ".jsonl" in path else CutSet.from_file(path)


def check_manifest(manifest) -> list[str]:
    """The ids of every cut, in manifest order, once the annotations the scores read are checked: entities (a list
    of strings or ``{text, type, ...}`` dicts), ``domain`` (a string), ``answers`` (a list of strings or numbers)
    and unique cut ids. A ``ValueError`` names the file, the cut and the field; a bad manifest line names its line."""
    ids, seen = [], {}
    for path in _paths(manifest):
        for cut in _cuts(path):
            where = f"{path}: cut {cut.id}"
            if cut.id in seen:
                raise ValueError(f"{where}: the id appears twice (also in {seen[cut.id]}); cut ids must be unique")
            seen[cut.id] = path
            for k, sup in enumerate(cut.supervisions):
                custom = sup.custom or {}
                entity_records(custom.get("entities"), f"{where}: supervisions[{k}].custom['entities']")
                if custom.get("domain") is not None and not isinstance(custom["domain"], str):
                    raise ValueError(f"{where}: supervisions[{k}].custom['domain'] must be a string, "
                                     f"got {custom['domain']!r}")
            for field, custom in (("custom", cut.custom), ("supervisions[0].custom",
                                                          cut.supervisions[0].custom if cut.supervisions else None)):
                answers = (custom or {}).get("answers")
                if answers is not None and (not isinstance(answers, list) or not all(
                        isinstance(a, (str, int, float)) and str(a).strip() for a in answers)):
                    raise ValueError(f"{where}: {field}['answers'] must be a list of non-empty strings, got {answers!r}")
            ids.append(cut.id)
    if not ids:
        raise ValueError(f"no cuts in {', '.join(_paths(manifest))}")
    return ids


def eval_loader(model, manifest, max_tokens: int = 8192, num_workers: int = 0, template: str = "{input}",
                text_input: bool = False):
    """Prompt-mode batches (left-padded; audio-first ASR prompts unless ``template`` / ``text_input`` say otherwise,
    see ``DatasetConfig``) of one manifest or a list, in order; this rank's DP share."""
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
    """``(batch, hypotheses)`` of every batch, greedy; a batch whose items were all dropped gives no hypotheses
    (its ``dropped`` still counts)."""
    model.eval()
    tok = model.tokenizer
    for batch in loader:
        if batch["input_ids"].shape[0] == 0:
            yield batch, []
            continue
        batch = model._to_device(batch)
        ids = greedy_generate(model.stage, batch, max_new_tokens, tok.eos_token_id, tok.pad_token_id or tok.eos_token_id)
        yield batch, decode_text(tok, ids)


def _gather(obj) -> list:
    """``obj`` of every rank (this process's alone without torch.distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _dp() -> tuple[int, int, bool]:
    """(DP rank, DP size, whether this rank writes its replica's files: TP rank 0)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1, True
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), ps.get_tensor_model_parallel_rank() == 0


def stream_path(output_dir, dp_rank: int, dp_size: int) -> Path:
    return Path(output_dir) / ("hypotheses.jsonl" if dp_size == 1 else f"hypotheses.dp{dp_rank}.jsonl")


@torch.no_grad()
def transcribe(model, manifest, max_new_tokens: int = 256, max_tokens: int = 8192, skipped: dict | None = None,
               stream_dir: str | Path | None = None) -> tuple[list[dict], float]:
    """Greedy ASR of every cut this rank decodes; returns rows and the audio seconds per decoding second (RTFx).
    ``skipped`` (a dict) receives the cuts dropped as bad input or too long (id -> reason); ``stream_dir``: append
    each batch's rows to ``stream_path`` there as they are decoded."""
    loader = eval_loader(model, manifest, max_tokens)
    dp_rank, dp_size, writer = _dp()
    sink = None
    if stream_dir is not None and writer:
        Path(stream_dir).mkdir(parents=True, exist_ok=True)
        sink = open(stream_path(stream_dir, dp_rank, dp_size), "w")
    rows, audio_s, t0 = [], 0.0, time.perf_counter()
    try:
        for batch, hyps in _decode(model, loader, max_new_tokens):
            audio_s += float(batch["audio_lens"].sum()) / model.frame_spec.sample_rate
            if skipped is not None:
                skipped.update(batch["dropped"])
            for i, cut_id in enumerate(batch["cut_ids"]):
                rows.append({"cut_id": cut_id, "reference": batch["texts"][i], "hypothesis": hyps[i],
                             "domain": batch["domains"][i], "entities": batch["entities"][i]})
                if sink is not None:
                    sink.write(json.dumps(rows[-1]) + "\n")
            if sink is not None:
                sink.flush()
    finally:
        if sink is not None:
            sink.close()
    if skipped is not None:
        skipped.update(loader.sampler.dropped)  # too long for max_tokens (every rank's sampler sees every cut)
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
    qa, paths = {}, []
    for path in _paths(manifest):
        found = {c.id: f for c in _cuts(path) if (f := qa_fields(c))}
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
             qa_max_new_tokens: int = 64, stream_dir: str | Path | None = None) -> tuple[list[dict], float, dict]:
    """``check_manifest``, ``transcribe`` every cut, then ``answer_questions``; under data parallelism each replica
    decodes its share and every rank returns all of it. Returns the rows in manifest order, the RTFx (all audio
    over the slowest rank's time) and ``skipped`` (id -> reason for every cut that has no row)."""
    ids = check_manifest(manifest)
    skipped: dict[str, str] = {}
    t0 = time.perf_counter()
    rows, rtfx = transcribe(model, manifest, max_new_tokens, max_tokens, skipped, stream_dir)
    asr_s = time.perf_counter() - t0
    qa = answer_questions(model, manifest, qa_template, qa_max_new_tokens, max_tokens)
    parts = _gather((rows, skipped, qa, rtfx * asr_s if _dp()[2] else 0.0, asr_s))
    by_id, skipped, qa = {}, {}, {}
    for part_rows, part_skipped, part_qa, _, _ in parts:
        for r in part_rows:  # the TP ranks of a replica, and a DP rank padding the last step, repeat rows
            by_id.setdefault(r["cut_id"], r)
        skipped.update(part_skipped)
        for cut_id, fields in part_qa.items():
            qa.setdefault(cut_id, {}).update(fields)
    rows = [by_id[i] | qa.get(i, {}) for i in ids if i in by_id]
    skipped = {i: skipped.get(i, "not_decoded: no batch held it and no reason was recorded") for i in ids
               if i not in by_id}
    rtfx = sum(p[3] for p in parts) / max(max(p[4] for p in parts), 1e-9)  # audio of all replicas / slowest rank
    return rows, rtfx, skipped


def qa_rows(rows: list[dict]) -> list[dict]:
    """The QA rows with per-answer correctness, for the report."""
    return [r | {"correct": qa_correct(r.get("answer"), r["answers"]),
                 "text_correct": qa_correct(r.get("answer_text"), r["answers"])} for r in rows if r.get("answers")]


def _finite(x):
    """NaN / infinity -> None, recursively: metrics.json stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def account(metrics: dict, skipped: dict[str, str]) -> dict:
    """``metrics`` plus the cuts it does not cover: ``num_cuts``, ``num_skipped``, ``skipped`` (id -> reason),
    ``skipped_by_reason`` (the reason's code -> count) and ``wer_covers`` (what the WER is computed over)."""
    n, with_ref = metrics["num_utterances"], metrics.get("wer_utterances", 0)
    by_reason: dict[str, int] = {}
    for why in skipped.values():
        code = why.split(":", 1)[0]
        by_reason[code] = by_reason.get(code, 0) + 1
    covers = (f"{with_ref} of {n + len(skipped)} cuts: the decoded ones with a reference transcript "
              f"({metrics.get('words', 0)} words); {len(skipped)} skipped (see skipped), "
              f"{n - with_ref} decoded without a reference")
    return metrics | {"num_cuts": n + len(skipped), "num_skipped": len(skipped), "skipped_by_reason": by_reason,
                      "skipped": dict(skipped), "wer_covers": covers}


def write_outputs(rows: list[dict], rtfx: float, output_dir: str | Path, name: str = "",
                  log_dir: str | Path | None = None, skipped: dict[str, str] | None = None) -> dict:
    """metrics.json, hypotheses.jsonl (replacing the per-batch stream and any per-replica ones), the plots and
    report.md; ``log_dir``: a training run's TensorBoard folder, whose loss curves join the plots."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = _finite(account(summarize(rows) | {"rtfx": rtfx}, skipped or {}))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    tmp = out / "hypotheses.jsonl.tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(out / "hypotheses.jsonl")
    for part in out.glob("hypotheses.dp*.jsonl"):
        part.unlink()
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
    lines += ["", f"WER covers {metrics['wer_covers']}." if "wer_covers" in metrics else "",
              f"RTFx (audio seconds per decoding second): {metrics['rtfx']:.1f}", ""]
    if metrics.get("num_skipped"):
        lines += [f"## Skipped cuts ({metrics['num_skipped']})", "", "| cut | reason |", "|---|---|"]
        lines += [f"| {c} | {_cell(why)} |" for c, why in list(metrics["skipped"].items())[:max_mentions]] + [""]
    if metrics["entity_accuracy_by_type"]:
        lines += ["| entity type | accuracy % |", "|---|---|"]
        lines += [f"| {t} | {plots.pct(a)} |" for t, a in metrics["entity_accuracy_by_type"].items()]
        lines += ["", "## Entity mentions (first misses)", "", "| cut | type | entity | hypothesis |", "|---|---|---|---|"]
        for m in [m for m in mentions if not m["correct"]][:max_mentions]:
            lines.append(f"| {m['cut_id']} | {m['type'] or '-'} | {m['entity']} | {_cell(m['hypothesis'])} |")
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
