"""See what the data path makes of a corpus: a few cuts as sequences, then a few sampler batches.

    python -m nemo_jstip.data.show manifest=CUTS.jsonl [text=FILE.txt] [config=YAML] [kind=interleaved|asr|mixed]
                                   [n=5] [batches=5] [epoch=0] [tokenizer=HF_FOLDER] [stats=0]

Each sequence is printed span by span, e.g. ``<bos> [S: dr patel | 11 frames] [T: prescribed* twenty*] <eos>*``:
``S`` spans are audio placeholders (the words they speak, and how many encoder frames), ``T`` spans are text
tokens as the tokenizer cut them, ``*`` marks a token that is a loss target. ``config`` is a data config as
``build_dataloader`` reads it (its ``interleave``, ``sampler`` and ``dataset`` sections are used; the streams come
from ``manifest``/``text``/``kind``) and may hold ``preprocessor``/``encoder``/``adapter`` for the ``FrameSpec``.
``stats=N`` adds what the first N cuts' examples of each kind give the model to learn from (``speech_use``): speech
frames only teach the encoder and adapter when a loss target follows them, so an interleaved example that ends in
speech, or is speech only, spends frames on nothing; span lengths near the utterance length make many such examples.
Without ``tokenizer`` a small byte-level BPE is trained on the shown data, offline, so the command runs anywhere.
No audio is read.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from lhotse import CutSet
from omegaconf import OmegaConf

from nemo_jstip.data.dataset import DatasetConfig, JSTIPDataset, make_cost_fn
from nemo_jstip.data.examples import Example, ExampleBuilder, add_special_tokens
from nemo_jstip.data.frames import FrameSpec
from nemo_jstip.data.interleave import SPEECH, InterleaveConfig
from nemo_jstip.data.nemo_types import _tag
from nemo_jstip.data.sampler import InterleavingSampler, Stream
from nemo_jstip.data.tokenizer import train_tokenizer

KINDS = {"interleaved": ("interleaved",), "asr": ("asr",), "mixed": ("asr", "interleaved")}
ARGS = {"manifest": None, "text": None, "config": None, "kind": "mixed", "n": "5", "batches": "5", "epoch": "0",
        "tokenizer": None, "stats": "0"}


def render(ex: Example, tokenizer, words: list[str]) -> str:
    """One line per example: ``<bos> [S: words | k frames] [T: tok* tok*] <eos>*`` (``*`` = loss target)."""
    target = [False, *ex.loss_mask[:-1].tolist()]  # position t is a target when labels[t - 1] is set
    tokens = lambda p0, p1: "".join(tokenizer.decode([i]) + "*" * target[t]  # noqa: E731
                                    for t, i in zip(range(p0, p1), ex.input_ids[p0:p1].tolist()))
    parts = ["<bos>"]
    for span, (p0, p1) in zip(ex.spans, ex.span_bounds.tolist()):
        if span.modality == SPEECH:
            parts.append(f"[S: {' '.join(words[span.start:span.end])} | {p1 - p0} frames]")
        else:
            parts.append(f"[T: {tokens(p0, p1).strip()}]")
    if ex.input_ids[-1] == tokenizer.eos_token_id and len(ex.input_ids) > ex.span_bounds[-1, 1]:
        parts.append("<eos>" + "*" * target[-1])
    return " ".join(parts)


def speech_use(examples: list[Example]) -> dict:
    """Shares of examples without any loss target and with a target after speech, and of speech frames that a
    target follows (a causal LM's loss at position t sees positions <= t, so later frames get no gradient)."""
    n, frames, useful, no_target, after_speech = len(examples), 0, 0, 0, 0
    for ex in examples:
        audio = ex.audio_frame_index >= 0
        targets = ex.loss_mask.nonzero()[0]
        last = targets[-1] if len(targets) else -1
        frames += int(audio.sum())
        useful += int(audio[: last + 1].sum())
        no_target += not len(targets)
        after_speech += bool(audio.any() and last > audio.argmax())
    return {"examples": n, "no_target": no_target / max(n, 1), "target_after_speech": after_speech / max(n, 1),
            "speech_frames_used": useful / frames if frames else 0.0}


def batch_line(i: int, batch: dict) -> str:
    s, kinds = batch["token_stats"], Counter(batch["kinds"])
    L = batch["input_ids"].shape[1]
    share = 1 - s["real_tokens"] / s["padded_tokens"] if s["padded_tokens"] else 0.0
    per_kind = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    return (f"batch {i}: {len(batch['kinds'])} examples ({per_kind}), L={L}, {s['real_tokens']} real / "
            f"{s['padded_tokens']} padded tokens ({share:.1%} padding), {s['loss_tokens']} loss tokens")


def main(argv: list[str] | None = None) -> None:
    args = dict(ARGS)
    for a in sys.argv[1:] if argv is None else argv:
        key, sep, value = a.partition("=")
        if not sep or key not in ARGS:
            raise SystemExit(f"bad argument {a!r}; usage: key=value with keys {list(ARGS)}\n\n{__doc__}")
        args[key] = value
    if not args["manifest"] or args["kind"] not in KINDS:
        raise SystemExit(__doc__)
    n, num_batches, epoch = int(args["n"]), int(args["batches"]), int(args["epoch"])
    cfg = OmegaConf.to_container(OmegaConf.load(args["config"]), resolve=True) if args["config"] else {}
    cuts = CutSet.from_file(args["manifest"]).to_eager()
    lines = [ln.strip() for ln in Path(args["text"]).read_text().splitlines() if ln.strip()] if args["text"] else []

    if args["tokenizer"]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args["tokenizer"])
        print(f"tokenizer: {args['tokenizer']} ({len(tokenizer)} tokens)")
    else:
        texts = [" ".join(s.text or "" for s in c.supervisions) for c in cuts] + lines
        tokenizer = train_tokenizer(texts)
        print(f"tokenizer: none given, so a byte-level BPE ({len(tokenizer)} tokens) was trained here, offline, on "
              f"the {len(texts)} transcripts and text lines; pass tokenizer=HF_FOLDER for the LLM's own tokens")
    icfg = InterleaveConfig(**cfg.get("interleave", {}))
    add_special_tokens(tokenizer, icfg)
    spec = FrameSpec.from_config(cfg) if {"preprocessor", "encoder"} & set(cfg) else FrameSpec()
    builder = ExampleBuilder(tokenizer, spec, icfg)
    dataset = JSTIPDataset(builder, DatasetConfig(**{**cfg.get("dataset", {}), "load_audio": False}), epoch=epoch)
    print(f"frames: {spec.hop_seconds * 1000:.0f} ms each; interleave: mode={icfg.mode}, markers={icfg.markers} "
          f"(wrap every S span), loss={icfg.loss}; S = speech span, T = text span, * = loss target\n")

    for cut in cuts.subset(first=n) if n else []:
        words = " ".join(s.text or "" for s in cut.supervisions).split()
        print(f"{cut.id} ({cut.duration:.2f} s): {' '.join(words)}")
        for kind in KINDS[args["kind"]]:
            ex = dataset.example(_tag(cut, kind), epoch)
            shown = "dropped (bad input, see the log)" if ex is None else render(ex, tokenizer, words)
            note = f"{kind}->{ex.kind}" if ex is not None and ex.kind != kind else kind
            print(f"  {note:<12} {shown}" + (f"  ({ex.cost} tokens)" if ex is not None else ""))
    if int(args["stats"]):
        sample = cuts.subset(first=min(int(args["stats"]), len(cuts)))
        for kind in KINDS[args["kind"]]:
            built = (dataset.example(_tag(c, kind), epoch) for c in sample)
            u = speech_use([ex for ex in built if ex and ex.kind == kind])
            print(f"speech use, {kind} ({u['examples']} examples): {u['no_target']:.1%} without a loss target, "
                  f"{u['target_after_speech']:.1%} with a target after speech, {u['speech_frames_used']:.1%} of "
                  f"speech frames followed by a target")
    for i, line in enumerate(lines[: min(n, 2)]):
        ex = builder.text(line, f"text:{i}")
        print(f"text:{i}\n  {'text':<12} {render(ex, tokenizer, line.split())}  ({ex.cost} tokens)")

    streams = [Stream(cuts, k, 1.0) for k in KINDS[args["kind"]]]
    if lines:
        streams.append(Stream(lines, "text", 0.5 * len(streams), name=Path(args["text"]).stem))
    opts = {"max_tokens": 2048, "max_item_cost": 256, "num_buckets": 4 if len(cuts) >= 50 else 1,
            **cfg.get("sampler", {})}
    cost_fn = make_cost_fn(builder, exact=True)
    sampler = InterleavingSampler(streams, cost_fn, **opts)
    sampler.set_epoch(epoch)
    cost_fn.follow(sampler)
    print(f"\nsampler: {', '.join(f'{s.kind} x{s.weight:g}' for s in streams)}; "
          + ", ".join(f"{k}={v}" for k, v in opts.items()))
    kinds, real, padded = Counter(), 0, 0
    for i, items in zip(range(num_batches), sampler):
        batch = dataset[items]
        print(batch_line(i, batch))
        kinds.update(batch["kinds"])
        real, padded = real + batch["token_stats"]["real_tokens"], padded + batch["token_stats"]["padded_tokens"]
    if padded:
        print(f"total: {sum(kinds.values())} examples ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}), "
              f"{real} real / {padded} padded tokens, padding share {1 - real / padded:.1%}")
    if dataset.stats:
        print(f"bad input: {dict(dataset.stats)}")


if __name__ == "__main__":
    main()
