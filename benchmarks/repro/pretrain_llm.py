"""Pretrain a small Llama-shaped HF LLM on the corpus text: the text prior of the small-scale reproduction.

    python -m benchmarks.repro.pretrain_llm corpus_dir=data/demo_corpus [out_dir=DIR] [steps=600 hidden_size=192 ...]

A real pretrained LLM (SmolLM2-135M) is too slow for a 20-run grid on 2 CPU cores, so the grid starts from a
few-million-parameter ``LlamaForCausalLM`` trained here in minutes and loaded through the same HF import as any
pretrained LLM (``model.llm.init_from_hf``). Its text, as an LLM's pretraining would hold such text:

- general sentences: the ASR training transcripts plus ``extra_general`` new ones from the same generator
  (never a general dev/test transcript);
- the domain text files (``*_text.txt``);
- the QA facts as ``Question: ...\\nAnswer: ...`` lines, ``qa_repeats`` times each: the world knowledge that zero-shot
  spoken QA asks about, in the evaluation's prompt, so the text-input QA upper bound is meaningful.

A ``heldout`` share of the general and domain lines is kept out for the held-out perplexity. The folder gets the
weights (safetensors), the HF config, the tokenizer (the corpus tokenizer plus JSTIP's special tokens, added the
way ``JSTIPModel`` adds them, so the recipe reads tokenizer and weights from one place), ``pretrain.json`` and
``replay_general.jsonl`` / ``replay_qa.jsonl``: the pretraining lines of the general text and of the QA facts (not
the domain text, which is what the systems differ in), for a fine-tuning mixture that replays them, each at its own
weight, to keep the LLM's knowledge (NeMo's ``txt_jsonl`` input type; docs/results.md, spoken QA). ``replay_general_new.jsonl``
holds the general lines that are not ASR training transcripts: general text of the transcripts' register that the
model never hears, the control that separates "transcript text" from "any general text" (docs/results.md).
Deterministic for a seed (single process, fixed data order).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class PretrainConfig:
    corpus_dir: str = "data/demo_corpus"
    out_dir: str | None = None  # default: {corpus_dir}/llm
    tokenizer: str | None = None  # default: {corpus_dir}/tokenizer
    seed: int = 0
    threads: int = 1  # torch threads: 1 is fastest for this size on a shared 2-core machine, and reproducible
    # model (the recipe's llm section must match: conf/jstip_repro.yaml)
    num_layers: int = 4
    hidden_size: int = 192
    ffn_hidden_size: int = 512
    num_attention_heads: int = 4
    num_query_groups: int = 2
    max_position_embeddings: int = 1024
    # text
    extra_general: int = 10000
    qa_repeats: int = 20
    heldout: float = 0.05
    # optimisation
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    log_every: int = 100


def corpus_lines(corpus_dir: str | Path, extra_general: int, qa_repeats: int, seed: int) -> dict[str, list[str]]:
    """``source -> lines``: general (ASR transcripts + generated), each domain's text, and the QA facts."""
    from lhotse import CutSet

    from nemo_jstip.evaluate import QA_TEMPLATE  # the evaluation's prompt, completed with the reference answer
    from nemo_jstip.prep.sentences import SentenceGenerator, load_domain

    d = Path(corpus_dir)
    general = [c.supervisions[0].text for c in CutSet.from_file(d / "general_train_cuts.jsonl")]
    # never a dev/test transcript: those sentences must stay unseen as text
    banned = {c.supervisions[0].text for p in sorted(d.glob("*_dev_cuts.jsonl")) + sorted(d.glob("*_test_cuts.jsonl"))
              for c in CutSet.from_file(p)}
    gen = SentenceGenerator(load_domain("general"), {}, "train", np.random.default_rng([seed, 17]))
    general += [s.text for s in gen.sample_unique(extra_general, exclude=banned | set(general))]
    out = {"general": general}
    for f in sorted(d.glob("*_text.txt")):
        out[f.stem.removesuffix("_text")] = [t for t in f.read_text().splitlines() if t.strip()]
    qa = load_domain("qa")["items"]
    out["qa"] = [f"{QA_TEMPLATE.format(input=q)} {a[0]}" for q, a in qa] * qa_repeats
    return out


REPLAY_SOURCES = ("general", "qa", "general_new")  # general_new: the general lines that are not ASR transcripts


def split_heldout(lines: dict[str, list[str]], share: float, seed: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``source -> training lines`` and ``source -> held-out lines`` (QA facts are knowledge: all of them train)."""
    rng = np.random.default_rng(seed)
    train, held = {}, {}
    for src, xs in lines.items():
        if src == "qa":
            train[src] = xs
            continue
        order = rng.permutation(len(xs))
        n = max(1, int(share * len(xs)))
        held[src] = [xs[i] for i in order[:n]]
        train[src] = [xs[i] for i in order[n:]]
    return train, held


def write_replay(cfg: PretrainConfig, out: Path, train: dict[str, list[str]] | None = None) -> None:
    """``out/replay_{source}.jsonl`` for ``REPLAY_SOURCES``: their training lines, ``{"text": ...}`` per line
    (recomputed, deterministically, when ``train`` is not given: a folder trained before the files existed gets them)."""
    from lhotse import CutSet

    if train is None:
        train = split_heldout(corpus_lines(cfg.corpus_dir, cfg.extra_general, cfg.qa_repeats, cfg.seed),
                              cfg.heldout, cfg.seed)[0]
    heard = {c.supervisions[0].text for c in CutSet.from_file(Path(cfg.corpus_dir) / "general_train_cuts.jsonl")}
    lines = {**train, "general_new": [x for x in train["general"] if x not in heard]}
    for src in REPLAY_SOURCES:
        with open(out / f"replay_{src}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": x}) + "\n" for x in lines[src])


def load_tokenizer(path: str | Path):
    """The corpus tokenizer with the audio placeholder and speech markers JSTIPModel adds."""
    from transformers import AutoTokenizer

    from nemo_jstip.data.examples import add_special_tokens
    from nemo_jstip.data.interleave import InterleaveConfig

    tok = AutoTokenizer.from_pretrained(str(path))
    add_special_tokens(tok, InterleaveConfig())
    return tok


def encode(tok, lines: list[str]) -> list[list[int]]:
    """``BOS line EOS`` per line: the layout of JSTIP's text-only examples."""
    ids = tok(lines, add_special_tokens=False)["input_ids"]
    return [[tok.bos_token_id, *x, tok.eos_token_id] for x in ids]


def _batch(seqs: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@torch.no_grad()
def perplexity(model, seqs: list[list[int]], pad: int, batch_size: int = 256) -> float:
    """exp(mean next-token loss over all target tokens), BOS not predicted, EOS predicted."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        b = _batch(seqs[i : i + batch_size], pad)
        n = int((b["labels"][:, 1:] != -100).sum())
        total += model(**b).loss.item() * n
        count += n
    model.train()
    return math.exp(total / max(count, 1))


@torch.no_grad()
def qa_text_accuracy(model, tok, max_new_tokens: int = 8) -> float:
    """Share of the QA facts the LLM completes from the evaluation's QA prompt (greedy), scored as the evaluation does."""
    from nemo_jstip.evaluate import QA_TEMPLATE
    from nemo_jstip.metrics import qa_correct
    from nemo_jstip.prep.sentences import load_domain

    model.eval()
    items = load_domain("qa")["items"]
    right = 0
    for q, answers in items:
        prompt = [tok.bos_token_id, *tok(QA_TEMPLATE.format(input=q), add_special_tokens=False)["input_ids"]]
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, len(prompt):], skip_special_tokens=True).strip().split("\n")[0]
        right += qa_correct(text, [str(a) for a in answers])
    model.train()
    return right / len(items)


def hf_config(cfg: PretrainConfig, tok):
    """The ``LlamaConfig`` of the model (the recipe's ``llm`` section is ``llm_config_from_hf`` of it)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


UNUSED_BY_TRAINING = ("out_dir", "tokenizer", "log_every")  # the tokenizer counts by content (tokenizer_sha)


def current(out: Path, cfg: PretrainConfig, tok_sha: str) -> dict | None:
    """``pretrain.json`` of ``out`` when its model is what ``cfg`` and the tokenizer would train, else None (retrain).
    A model folder without ``pretrain.json`` (an LLM from elsewhere, e.g. SmolLM2) is used as it is, never overwritten."""
    if not (out / "model.safetensors").exists():
        return None
    if not (out / "pretrain.json").exists():
        print(f"pretrain_llm: {out} holds a model this script did not train (no pretrain.json): left as it is")
        return {}
    previous = json.loads((out / "pretrain.json").read_text())
    same = {k: v for k, v in asdict(cfg).items() if k not in UNUSED_BY_TRAINING} == \
        {k: v for k, v in previous["config"].items() if k not in UNUSED_BY_TRAINING}
    if same and previous.get("tokenizer_sha") == tok_sha:
        print(f"pretrain_llm: reusing {out} (same settings and tokenizer)")
        return previous
    print(f"pretrain_llm: retraining {out}: " + ("its tokenizer differs" if same else "its settings differ"))
    return None


def pretrain(cfg: PretrainConfig) -> dict:
    """Train, report perplexities, save the HF folder; returns what ``pretrain.json`` holds."""
    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    corpus = Path(cfg.corpus_dir)
    out = Path(cfg.out_dir or corpus / "llm")
    tok_dir = Path(cfg.tokenizer or corpus / "tokenizer")
    tok_sha = hashlib.blake2b((tok_dir / "tokenizer.json").read_bytes(), digest_size=16).hexdigest()
    if (previous := current(out, cfg, tok_sha)) is not None:
        if previous and not all((out / f"replay_{src}.jsonl").exists() for src in REPLAY_SOURCES):
            write_replay(cfg, out)
        return previous
    tok = load_tokenizer(tok_dir)
    train_by_source, held_lines = split_heldout(corpus_lines(corpus, cfg.extra_general, cfg.qa_repeats, cfg.seed),
                                                cfg.heldout, cfg.seed)
    train = encode(tok, [x for xs in train_by_source.values() for x in xs])
    held = {src: encode(tok, xs) for src, xs in held_lines.items()}
    pad = tok.pad_token_id
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(hf_config(cfg, tok))
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, cosine to 10%
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s / cfg.steps, 1)))))
    rng = np.random.default_rng(cfg.seed)
    order, pos = rng.permutation(len(train)), 0
    ntok = sum(map(len, train))
    print(f"pretrain_llm: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, vocab {len(tok)}, "
          f"{len(train)} training lines ({ntok} tokens), held-out {sum(map(len, held.values()))} lines")
    model.train()
    for step in range(cfg.steps):
        if pos + cfg.batch_size > len(order):
            order, pos = rng.permutation(len(train)), 0
        b = _batch([train[i] for i in order[pos : pos + cfg.batch_size]], pad)
        pos += cfg.batch_size
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_every == 0 or step == 0:
            print(f"step {step + 1}/{cfg.steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    sample = [train[i] for i in np.random.default_rng(cfg.seed + 1).permutation(len(train))[:2000]]
    result = {
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "train_tokens_seen": cfg.steps * cfg.batch_size * ntok // len(train),
        "train_ppl": perplexity(model, sample, pad),
        "heldout_ppl": perplexity(model, [s for xs in held.values() for s in xs], pad),
        "heldout_ppl_per_source": {src: perplexity(model, xs, pad) for src, xs in held.items()},
        "qa_text_accuracy": qa_text_accuracy(model, tok),
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    write_replay(cfg, out, train_by_source)
    result["seconds"] = round(time.time() - t0, 1)
    result["tokenizer_sha"] = tok_sha
    (out / "pretrain.json").write_text(json.dumps({"config": asdict(cfg), **result}, indent=1))
    print(f"pretrain_llm: train ppl {result['train_ppl']:.2f}, held-out ppl {result['heldout_ppl']:.2f} "
          + " ".join(f"{k} {v:.2f}" for k, v in result["heldout_ppl_per_source"].items())
          + f", QA (text) {100 * result['qa_text_accuracy']:.0f}%, {result['seconds']} s -> {out}")
    return result


def main(argv: list[str] | None = None) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(PretrainConfig), OmegaConf.from_cli(argv if argv is not None else sys.argv[1:]))
    return pretrain(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
