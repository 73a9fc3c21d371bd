"""Forced-alignment speed and word-boundary error against the embedded corpus' exact espeak-ng word times.

    python benchmarks/bench_align.py [--corpus /tmp/c] [--cuts 600] [--nemo-model PATH.nemo|NAME] [--nemo-cuts 40]

Takes the first cuts of every split round-robin (general, medical, banking, qa; training and held-out voices),
strips their alignments and re-aligns them with each backend. One row per backend: cuts aligned, speed (cuts/s and
x real time, one process), mean / median / p90 absolute start and end error (s), the share of boundaries (starts
and ends) within 50 / 100 ms, and the words pocketsphinx had to pronounce by g2p (with their mean error).
Without --nemo-model the nemo_ctc row uses a randomly initialised model shaped like stt_en_fastconformer_ctc_large
(BPE tokenizer trained on the corpus text): its speed is indicative, its errors are meaningless.
"""

import argparse
import tempfile
import time
from itertools import chain, zip_longest
from pathlib import Path

import numpy as np
from lhotse import load_manifest

from nemo_jstip.prep.align import AlignStats, NemoCtcAligner, PocketsphinxAligner, align_cuts


def load_cuts(corpus: Path, n: int) -> list:
    splits = [load_manifest(p) for p in sorted(corpus.glob("*_cuts.jsonl"))]
    cuts = [c for c in chain.from_iterable(zip_longest(*splits)) if c is not None][:n]
    refs = {c.id: [(a.symbol, a.start, a.end) for a in c.supervisions[0].alignment["word"]] for c in cuts}
    for c in cuts:
        c.supervisions[0].alignment = None
    return cuts, refs


def random_fastconformer_ctc_large(texts: list[str], workdir: str):
    """stt_en_fastconformer_ctc_large's architecture (17 x d512, 8x subsampling, BPE) with random weights and a
    512-token BPE tokenizer trained on `texts`: realistic compute, meaningless output."""
    from omegaconf import OmegaConf

    from nemo.collections.asr.models import EncDecCTCModelBPE
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    Path(workdir, "text.txt").write_text("\n".join(texts) + "\n")
    create_spt_model(f"{workdir}/text.txt", 512, -1, True, "bpe", output_dir=f"{workdir}/tok")
    cfg = {
        "sample_rate": 16000,
        "tokenizer": {"dir": f"{workdir}/tok", "type": "bpe"},
        "preprocessor": {"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
                         "sample_rate": 16000, "features": 80, "window_size": 0.025, "window_stride": 0.01},
        "encoder": {"_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": 80, "n_layers": 17,
                    "d_model": 512, "n_heads": 8, "subsampling": "dw_striding", "subsampling_factor": 8,
                    "subsampling_conv_channels": 256, "ff_expansion_factor": 4, "conv_kernel_size": 9},
        "decoder": {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": 512, "num_classes": -1},
    }  # fmt: skip
    return EncDecCTCModelBPE(cfg=OmegaConf.create(cfg))


def measure(name: str, aligner, cuts: list, refs: dict) -> str:
    stats = AlignStats()
    t = time.perf_counter()
    out = list(align_cuts(cuts, aligner, "drop", stats))
    dt = time.perf_counter() - t
    s, e, g2p = [], [], []  # per word: start error, end error, pronounced by g2p
    g2p_words = getattr(aligner, "g2p_words", set())
    for c in out:
        ali = [(a.symbol, a.start, a.end) for a in c.supervisions[0].alignment["word"]]
        assert [a[0] for a in ali] == [r[0] for r in refs[c.id]], c.id
        s += [abs(a[1] - r[1]) for a, r in zip(ali, refs[c.id])]
        e += [abs(a[2] - r[2]) for a, r in zip(ali, refs[c.id])]
        g2p += [a[0].lower() in g2p_words for a in ali]
    s, e, g2p = np.array(s), np.array(e), np.array(g2p, bool)
    both = np.concatenate([s, e])
    oov = f"{g2p.sum()} ({(s[g2p] + e[g2p]).mean() / 2:.3f})" if g2p.any() else "-"
    return (
        f"| {name} | {stats.aligned}/{stats.cuts} | {len(s)} | {stats.cuts / dt:.1f} | {stats.audio_s / dt:.0f}x | "
        f"{s.mean():.3f} / {np.median(s):.3f} / {np.percentile(s, 90):.3f} | "
        f"{e.mean():.3f} / {np.median(e):.3f} / {np.percentile(e, 90):.3f} | "
        f"{(both <= 0.05).mean():.1%} | {(both <= 0.1).mean():.1%} | {oov} |"
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", default="/tmp/c")
    p.add_argument("--cuts", type=int, default=600)
    p.add_argument("--nemo-model", default=None)
    p.add_argument("--nemo-cuts", type=int, default=40)
    args = p.parse_args()
    cuts, refs = load_cuts(Path(args.corpus), args.cuts)
    hours = sum(c.duration for c in cuts) / 3600
    print(f"{len(cuts)} cuts ({hours * 60:.1f} min) from {args.corpus}")
    print("| backend | cuts aligned | words | cuts/s | x real time | start err mean / median / p90 (s) "
          "| end err mean / median / p90 (s) | within 50 ms | within 100 ms | g2p words (mean err) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(measure("pocketsphinx beam=1e-80 g2p=espeak", PocketsphinxAligner(1e-80, "espeak"), cuts, refs), flush=True)
    print(measure("pocketsphinx beam=1e-48 g2p=espeak", PocketsphinxAligner(1e-48, "espeak"), cuts, refs), flush=True)
    print(measure("pocketsphinx beam=1e-80 g2p=letters", PocketsphinxAligner(1e-80, "letters"), cuts, refs), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.nemo_model:
            model, name = args.nemo_model, f"nemo_ctc {args.nemo_model}"
        else:
            texts = [c.supervisions[0].text for c in load_manifest(Path(args.corpus) / "general_train_cuts.jsonl")]
            model, name = random_fastconformer_ctc_large(texts, tmp), "nemo_ctc random FastConformer-L (speed only)"
        aligner = NemoCtcAligner(model, batch_size=8, device="cpu")
        print(measure(name, aligner, cuts[: args.nemo_cuts], refs), flush=True)


if __name__ == "__main__":
    main()
