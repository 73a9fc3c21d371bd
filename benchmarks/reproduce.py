"""The small-scale reproduction (docs/results.md): systems x seeds, each trained and evaluated, mean ± std over seeds.

    nice -n 10 .venv/bin/python benchmarks/reproduce.py [--seeds 3] [--systems asr_only,joint,...] [--steps N]
        [--out nemo_experiments/repro] [--jobs 2] [--dev-only | --splits test] [--tag NAME --set KEY=VALUE ...]
        [--eval-set KEY=VALUE ...] [--config jstip_smollm2] [--baseline joint,asr_only] [--dry-run | --aggregate-only]

Systems are the mixtures of conf/mixture/ (ASR-only, joint, JSTIP word / segment / mixed, JSTIP with synthetic TTS
pairs instead of the domain text), trained with conf/jstip_repro.yaml (a small LLM pretrained here on the corpus
text, ``benchmarks.repro.pretrain_llm``) and a speech encoder CTC-pretrained here on the general ASR data
(``benchmarks.repro.pretrain_encoder``). Each run is ``examples/jstip_train.py`` then ``examples/jstip_eval.py`` on
the dev sets and on the test sets with spoken QA, as subprocesses, so a crash or a kill loses one run only.
Resumable: a run whose eval ``metrics.json`` exists is skipped, an existing ``.nemo`` is not retrained, and a killed
training run continues from its last checkpoint (``exp_manager.resume_if_exists``). The aggregate (Markdown tables of
the seed means and of each system paired with each ``--baseline`` seed by seed, plots via ``nemo_jstip.plots.compare``)
goes between the markers of ``--results`` (docs/results.md, the rest of the file is kept) and PNGs under ``--plots``
(docs/results/). Run folders are git-ignored and a fresh checkout has none, so each finished run's evaluations
(metrics, hypotheses gzipped, timing) and the fingerprint of the encoder and LLM it was trained on are also copied to
``--archive`` (docs/runs/OUT_NAME/, committed); the aggregation reads a run from there when its folder is gone, and
pairs two runs only when they were trained on the same prepared encoder and LLM (a fresh checkout's encoder build
differs slightly). So the prepared pair itself is committed too (``--build``, pretrained/) and restored
before prep where missing.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SYSTEMS = ("asr_only", "joint", "jstip_word", "jstip_segment", "jstip_mixed", "jstip_synthetic")
CONTROLS = ("joint_transcripts", "jstip_word_transcripts")  # mixtures run on request only, not in the default grid
CORPUS, TTS_CORPUS = "data/demo_corpus", "data/demo_corpus_tts"
ENCODER = f"{CORPUS}/asr_ctc/asr_ctc.nemo"  # conf/jstip_repro.yaml's pretrained.asr_encoder
BUILD = "pretrained"  # the committed encoder + LLM that the runs of docs/runs/repro_6k/ (seeds 3-5) trained on
TTS_SIZES = ["sizes.medical_textspeech=1500", "sizes.banking_textspeech=1500"]
DOMAINS = ("general", "medical", "banking")
SPLITS = {"dev": [f"{CORPUS}/{d}_dev_cuts.jsonl" for d in DOMAINS],
          "test": [f"{CORPUS}/{d}_test_cuts.jsonl" for d in DOMAINS] + [f"{CORPUS}/qa_test_cuts.jsonl"]}
# recipe (conf/NAME.yaml) -> its LLM folder (pretrained.hf_llm) and the prep module that makes it
RECIPES = {"jstip_repro": (f"{CORPUS}/llm", "pretrain_llm"), "jstip_smollm2": ("data/smollm2", "hf_llm")}
ENV = dict(os.environ)  # the subprocesses' environment (--threads sets OMP_NUM_THREADS)
BEGIN, END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> seeds 1, 2, 3; ``"4,7"`` -> seeds 4 and 7; ``"4,"`` -> seed 4 alone."""
    return [int(s) for s in text.split(",") if s] if "," in text else list(range(1, int(text) + 1))


def run_name(system: str, seed: int, tag: str = "") -> str:
    """The run's folder name. In the aggregation a system may be a label ``SYSTEM@TAG``: that system's runs made with
    another ``--tag`` (a ``--set`` variant), tabulated and paired beside the runs of ``tag``."""
    system, at, own = system.partition("@")
    tag = own if at else tag
    return f"{system}{'_' + tag if tag else ''}_s{seed}"


def prep_commands(systems: list[str], llm_dir: str, encoder: str, config: str = "jstip_repro"
                  ) -> list[list[tuple[str | None, list[str]]]]:
    """(what it makes, command) for the shared inputs, in stages (a stage's commands run side by side, after the
    stage before): the corpus, its tokenizer, then the LLM folder (these three always run: each reuses a current
    folder in seconds and rebuilds a stale one; a recipe's LLM from elsewhere is exported once), the speech
    encoder and, for jstip_synthetic, the TTS corpus."""
    llm = ([PY, "-m", "benchmarks.repro.pretrain_llm", f"corpus_dir={CORPUS}"] if RECIPES[config][1] == "pretrain_llm"
           else [PY, "-m", f"benchmarks.repro.{RECIPES[config][1]}"])
    last = [(None, llm + [f"out_dir={llm_dir}"]),
            (encoder, [PY, "-m", "benchmarks.repro.pretrain_encoder", f"corpus_dir={CORPUS}", f"out={encoder}"])]
    if "jstip_synthetic" in systems:  # always run, like the corpus: rebuilt when the corpus defaults change
        last.append((None, [PY, "-m", "nemo_jstip.prep.corpus", f"out_dir={TTS_CORPUS}", *TTS_SIZES]))
    return [[(None, [PY, "-m", "nemo_jstip.prep.corpus", f"out_dir={CORPUS}"])],
            [(None, [PY, "-m", "nemo_jstip.prep.tokenizer", f"corpus_dir={CORPUS}"])],
            last]


def run_commands(system: str, seed: int, out: Path, steps: int | None, extra: list[str], tag: str = "",
                 splits=("dev", "test"), config: str = "jstip_repro", eval_extra: list[str] = ()) -> dict[str, list[str]]:
    """``{"train": cmd, "eval_dev": cmd, ...}`` for one run. exp_manager's folder is ``out/train/NAME`` (it moves
    the files it finds there into ``run_N`` on every start); logs, timings and evaluations go to ``out/NAME``."""
    name = run_name(system, seed, tag)
    nemo = out / f"{name}.nemo"
    train = [PY, "examples/jstip_train.py", "--config-name", config, f"mixture={system}", f"seed={seed}",
             f"name={name}", f"exp_manager.exp_dir={out / 'train'}", f"model_out={nemo}"]
    if system == "jstip_synthetic":
        train.append(f"data.corpus_dir={TTS_CORPUS}")
    if steps:
        train.append(f"trainer.max_steps={steps}")
    cmds = {"train": train + list(extra)}
    for split in splits:
        cmds[f"eval_{split}"] = [PY, "examples/jstip_eval.py", f"model={nemo}", f"data.manifest=[{','.join(SPLITS[split])}]",
                                 f"output_dir={out / name / f'eval_{split}'}", f"name={name}",
                                 f"log_dir={out / 'train' / name}", *eval_extra]
    return cmds


def fingerprint(path: str | Path) -> str | None:
    """12 hex digits of a prepared input's content: a .nemo's members (not its tar headers, whose times change on
    every save), a folder's ``*.safetensors``, else the file's bytes; None when it does not exist."""
    path, h = Path(path), hashlib.sha256()
    if path.is_dir():
        for f in sorted(path.glob("*.safetensors")):
            h.update(f.read_bytes())
    elif path.suffix == ".nemo" and path.is_file():
        with tarfile.open(path) as tar:
            for m in sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name):
                h.update(m.name.encode() + tar.extractfile(m).read())
    elif path.is_file():
        h.update(path.read_bytes())
    else:
        return None
    return h.hexdigest()[:12]


def save_build(build: Path, encoder: Path, llm: Path, config: str = "jstip_repro") -> dict:
    """Copy the prepared encoder (.nemo and its ``pretrain.json``) and LLM folder (less the replay text, which
    ``pretrain_llm`` rewrites) to ``build`` with their fingerprints in ``build.json``. Committed, it spares a fresh
    checkout the encoder's 45-85 min of CPU training, whose result differs slightly on every machine, so its runs pair
    with the archived ones."""
    parts = {"encoder": (encoder, [encoder, encoder.parent / "pretrain.json"]),
             "llm": (llm, [f for f in sorted(llm.iterdir()) if f.is_file() and not f.name.startswith("replay_")])}
    for part, (_, files) in parts.items():
        (build / part).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, build / part / f.name)
    record = {"config": config} | {part: fingerprint(made) for part, (made, _) in parts.items()}
    (build / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def restore_build(build: Path, encoder: Path, llm: Path, config: str = "jstip_repro") -> list[str]:
    """Put a saved build's parts where prep would make them, each only where it is missing (never over an existing
    one) and only for the recipe it was saved for; returns the parts restored. A copy whose fingerprint is not the
    one in ``build.json`` (a truncated file, a Git LFS pointer) is removed again and stops the run, naming it."""
    record, restored = json.loads((build / "build.json").read_text()), []
    if record["config"] != config:
        return restored
    for part, made, present in (("encoder", encoder, encoder.exists()),
                                ("llm", llm, (llm / "model.safetensors").exists())):
        if present:
            continue
        target = made.parent if part == "encoder" else made
        target.mkdir(parents=True, exist_ok=True)
        files = [shutil.copyfile(f, made if f.suffix == ".nemo" else target / f.name)
                 for f in sorted((build / part).iterdir())]
        if (got := fingerprint(made)) != record[part]:
            for f in files:
                Path(f).unlink()
            raise SystemExit(f"{build / part}: fingerprint {got} is not build.json's {record[part]}; "
                             "the committed build is damaged (fetch it again, or pass --build '' to prepare anew)")
        restored.append(part)
    return restored


def archive_run(out: Path, name: str, archive: Path) -> bool:
    """Copy a run's evaluations, timing and build to ``archive/name`` (hypotheses gzipped without a timestamp, so
    an unchanged run rewrites identical bytes); False when it has no evaluation yet."""
    src, dst = out / name, archive / name
    evals = sorted(d for d in src.glob("eval_*") if (d / "metrics.json").exists())
    for d in evals:
        (dst / d.name).mkdir(parents=True, exist_ok=True)
        (dst / d.name / "metrics.json").write_bytes((d / "metrics.json").read_bytes())
        if (d / "hypotheses.jsonl").exists():
            (dst / d.name / "hypotheses.jsonl.gz").write_bytes(gzip.compress((d / "hypotheses.jsonl").read_bytes(), mtime=0))
    for f in ("timing.json", "build.json"):
        if evals and (src / f).exists():
            (dst / f).write_bytes((src / f).read_bytes())
    return bool(evals)


def _run(cmd: list[str], log: Path, on_tick=None, tick_s: float = 60.0) -> float:
    """Run from the repo root, output to ``log``; returns wall seconds; raises on failure. ``on_tick(seconds so
    far)`` is called every ``tick_s`` while it runs, so a killed run still leaves its time behind."""
    t0 = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=ENV)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=tick_s)
                    break
                except subprocess.TimeoutExpired:
                    if on_tick:
                        on_tick(time.time() - t0)
        except BaseException:  # Ctrl-C: like subprocess.run, leave no orphan behind
            proc.kill()
            raise
    if rc:
        raise RuntimeError(f"exit {rc}: {shlex.join(cmd)} (log: {log})")
    return time.time() - t0


def run_one(system: str, seed: int, out: Path, cmds: dict[str, list[str]], tag: str = "",
            build: dict | None = None) -> dict:
    """Train (unless the .nemo exists) and evaluate (unless metrics.json exists); times go to ``timing.json``,
    updated every minute, so a run resumed after a kill adds to the time it had spent. ``build`` (the prepared
    inputs' fingerprints) goes to ``build.json`` when training starts; a resumed run keeps the one it began with."""
    name = run_name(system, seed, tag)
    rdir = out / name
    timing_path = rdir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    if build and not (rdir / "build.json").exists() and not (out / f"{name}.nemo").exists():
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "build.json").write_text(json.dumps(build, indent=1))

    def record(step: str, seconds: float) -> None:
        timing[step] = round(seconds, 1)
        rdir.mkdir(parents=True, exist_ok=True)
        timing_path.write_text(json.dumps(timing, indent=1))

    for step, cmd in cmds.items():
        done = (out / f"{name}.nemo").exists() if step == "train" else (rdir / step / "metrics.json").exists()
        if done:
            continue
        print(f"[{name}] {step} ...", flush=True)
        before = timing.get(step, 0.0)  # the time of a killed attempt
        record(step, before + _run(cmd, rdir / f"{step}.log", on_tick=lambda s: record(step, before + s)))
        print(f"[{name}] {step} took {timing[step] / 60:.1f} min", flush=True)
    return timing


# ---------------------------------------------------------------------------------------------- aggregation
def mean_metrics(runs: list[dict]) -> dict:
    """Mean over seeds of every numeric leaf present in all runs (same nesting), for ``nemo_jstip.plots``."""
    first = runs[0]
    out = {}
    for k, v in first.items():
        vals = [r.get(k) for r in runs]
        if isinstance(v, dict) and all(isinstance(x, dict) for x in vals):
            out[k] = mean_metrics(vals)
        elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            out[k] = statistics.fmean(vals)
        else:
            out[k] = None if any(x is None for x in vals) else v
    return out


# (column, path into metrics.json); values are shares, shown in percent
COLUMNS = [("WER", ("wer",)), *[(f"{d} WER", ("domains", d, "wer")) for d in DOMAINS],
           ("entity acc", ("entity_accuracy",)),
           *[(f"{d} entity acc", ("domains", d, "entity_accuracy")) for d in DOMAINS[1:]],
           ("entity acc, seen in text", ("entity_accuracy_by_seen_in_text", "True")),
           ("entity acc, unseen", ("entity_accuracy_by_seen_in_text", "False")),
           ("spoken QA", ("qa_accuracy",)), ("QA as text (upper bound)", ("qa_text_accuracy",))]


def _get(m: dict, path: tuple) -> float | None:
    for k in path:
        m = m.get(k) if isinstance(m, dict) else None
    return m


def mean_std(values: list[float], scale: float = 100.0) -> str:
    """``"12.3 ± 0.4"``, shares in percent by default (sample std; none for one seed)."""
    if not values:
        return "-"
    m = scale * statistics.fmean(values)
    return f"{m:.1f} ± {scale * statistics.stdev(values):.1f}" if len(values) > 1 else f"{m:.1f}"


def _run_dir(out: Path, name: str, rel: str, archive: Path | None = None) -> Path | None:
    """The run's folder if it holds ``rel`` (e.g. ``eval_dev/metrics.json``), else its archived copy if that does."""
    return next((root / name for root in (out, archive) if root and (root / name / rel).exists()), None)


def collect(out: Path, systems: list[str], seeds: list[int], split: str, tag: str = "",
            archive: Path | None = None) -> dict[str, list[dict]]:
    """``system -> [metrics of each finished seed]`` (systems without any finished seed are left out)."""
    found = {}
    for s in systems:
        ms = [json.loads((d / f"eval_{split}" / "metrics.json").read_text()) for seed in seeds
              if (d := _run_dir(out, run_name(s, seed, tag), f"eval_{split}/metrics.json", archive))]
        if ms:
            found[s] = ms
    return found


def table(found: dict[str, list[dict]], timings: dict[str, list[float]] | None = None) -> str:
    """Markdown: one row per system, mean ± std over seeds for each column that any system has."""
    cols = [(c, p) for c, p in COLUMNS if any(_get(m, p) is not None for ms in found.values() for m in ms)]
    head = ["system", "seeds", *[f"{c} %" for c, _ in cols]] + (["min / run"] if timings else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s, ms in found.items():
        cells = [s, str(len(ms))]
        cells += [mean_std([v for m in ms if (v := _get(m, p)) is not None]) for _, p in cols]
        if timings:
            t = timings.get(s) or []
            cells.append(f"{statistics.fmean(t) / 60:.1f}" if t else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _decoded(out: Path, system: str, seed: int, split: str, tag: str,
             archive: Path | None = None) -> tuple[dict, list[dict], dict] | None:
    """(metrics, hypotheses, build) of an evaluated run; None without its hypotheses."""
    if not (d := _run_dir(out, run_name(system, seed, tag), f"eval_{split}/metrics.json", archive)):
        return None
    e = d / f"eval_{split}"
    if (e / "hypotheses.jsonl").exists():
        text = (e / "hypotheses.jsonl").read_text()
    elif (e / "hypotheses.jsonl.gz").exists():
        text = gzip.decompress((e / "hypotheses.jsonl.gz").read_bytes()).decode()
    else:
        return None
    build = json.loads((d / "build.json").read_text()) if (d / "build.json").exists() else {}
    return json.loads((e / "metrics.json").read_text()), [json.loads(x) for x in text.splitlines() if x.strip()], build


def _deltas(pairs: list[tuple], path: tuple) -> list[float]:
    return [x - y for (ma, *_), (mb, *_) in pairs if (x := _get(ma, path)) is not None and (y := _get(mb, path)) is not None]


def paired_table(out: Path, systems: list[str], seeds: list[int], split: str, baseline: str, tag: str = "",
                 archive: Path | None = None) -> str:
    """Markdown: each system against ``baseline`` trained with the same seed. Per-seed differences in percentage points
    (mean ± std over seeds; entity accuracy + = more than the baseline, WER + = worse), how many seeds are ahead, and
    the entity mentions only one of the pair gets, summed over seeds, with McNemar's exact p-value (pooled and per
    seed): chance in the mentions, which the seed spread does not show, and vice versa. Runs whose ``build.json``
    name different prepared inputs are not paired (counted below the table). Empty when nothing pairs."""
    from nemo_jstip.metrics import paired_mentions, sign_test

    cols = [("WER", ("wer",)), *[(f"{d} WER", ("domains", d, "wer")) for d in DOMAINS]]
    lines, unpaired = [], 0
    for s in systems:
        if s == baseline:
            continue
        both = [(a, b) for seed in seeds if (a := _decoded(out, s, seed, split, tag, archive))
                and (b := _decoded(out, baseline, seed, split, tag, archive))]
        pairs = [(a, b) for a, b in both if not (a[2] and b[2] and a[2] != b[2])]
        unpaired += len(both) - len(pairs)
        if not pairs:
            continue
        pm = [paired_mentions(a[1], b[1]) for a, b in pairs]
        won, lost = sum(p["a_only"] for p in pm), sum(p["b_only"] for p in pm)
        ent = _deltas(pairs, ("entity_accuracy",))
        lines.append("| " + " | ".join([s, str(len(pairs)), mean_std(ent), f"{sum(d > 0 for d in ent)} of {len(ent)}",
                                        f"{won} / {lost}", f"{sign_test(won, lost):.2g}",
                                        ", ".join(f"{p['p_value']:.2g}" for p in pm),
                                        *[mean_std(_deltas(pairs, path)) for _, path in cols]]) + " |")
    note = f"({unpaired} seeds not paired: trained on different encoder / LLM builds)\n" if unpaired else ""
    if not lines:
        return note
    head = ["system", "seeds", "Δ entity acc pp", "seeds ahead", "mentions only it / only the baseline gets",
            "McNemar p (pooled)", "McNemar p per seed", *[f"Δ {c} pp" for c, _ in cols]]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines]) + "\n" + (note and "\n" + note)


def aggregate(out: Path, systems: list[str], seeds: list[int], results: Path, plots: Path, tag: str = "",
              baselines: tuple[str, ...] = ("joint",), archive: Path | None = None) -> str:
    """Tables (dev and test; each system paired with each of ``baselines`` on the same seed) + plots of the seed
    means; written between the markers of ``results``. Runs missing from ``out`` are read from ``archive``."""
    from nemo_jstip.plots import compare

    timings = {}
    for s in systems:
        ts = [json.loads((d / "timing.json").read_text()) for seed in seeds
              if (d := _run_dir(out, run_name(s, seed, tag), "timing.json", archive))]
        timings[s] = [sum(t.values()) for t in ts if "train" in t]
    shown = os.path.relpath(out, ROOT) if Path(out).resolve().is_relative_to(ROOT) else out
    parts = [BEGIN, f"_Generated by `benchmarks/reproduce.py` from `{shown}` (seeds {seeds}); mean ± sample std over "
             "seeds, in percent; minutes per run = train + evaluations, as measured._\n"]
    for split in ("test", "dev"):
        found = collect(out, systems, seeds, split, tag, archive)
        if not found:
            continue
        parts += [f"### {split} sets\n", table(found, timings if split == "test" else None)]
        for baseline in baselines:
            if paired := paired_table(out, systems, seeds, split, baseline, tag, archive):
                parts += [f"Paired with {baseline} (same seed):\n", paired]
        mean_dir = out / f"mean_{split}"
        dirs = {}
        for s, ms in found.items():
            (mean_dir / s).mkdir(parents=True, exist_ok=True)
            (mean_dir / s / "metrics.json").write_text(json.dumps(mean_metrics(ms), indent=1))
            dirs[s] = mean_dir / s
        logs = {s: out / "train" / run_name(s, seeds[0], tag) for s in found}
        cmp = compare(dirs, plots / split, logs if split == "test" else None)
        rel = os.path.relpath(cmp.parent, results.parent)
        parts += [f"![entity accuracy per domain, {split}]({rel}/entity_accuracy.png)\n"]
        if (cmp.parent / "qa_accuracy.png").exists():
            parts.append(f"![zero-shot spoken QA, {split}]({rel}/qa_accuracy.png)\n")
        if (cmp.parent / "loss.png").exists():
            parts.append(f"![training loss (seed {seeds[0]})]({rel}/loss.png)\n")
    parts.append(END)
    block = "\n".join(parts)
    text = results.read_text() if results.exists() else "# Results\n\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Grid (generated)\n\n" + block + "\n"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)
    return block


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="3", help="how many (3 -> seeds 1,2,3) or a comma list (default 3)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of mixtures (default: {','.join(SYSTEMS)}); "
                   "with --aggregate-only also SYSTEM@TAG, the runs of another --tag (a --set variant)")
    p.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the recipe's)")
    p.add_argument("--out", default="nemo_experiments/repro", help="run folders, .nemo files, logs")
    p.add_argument("--config", default="jstip_repro", choices=sorted(RECIPES),
                   help="the training recipe, conf/NAME.yaml (jstip_smollm2: SmolLM2-135M held by LoRA)")
    p.add_argument("--llm", default=None, help="the LLM folder (default: the recipe's; made, or remade when stale, "
                   "unless it holds an LLM from elsewhere)")
    p.add_argument("--encoder", default=ENCODER, help="the CTC-pretrained encoder .nemo (made if missing)")
    p.add_argument("--tag", default="", help="suffix of run names, for variants made with --set")
    # "extend": a repeated --set adds to the earlier ones instead of silently replacing them
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra training overrides (hydra)")
    p.add_argument("--eval-set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra evaluation overrides (conf/jstip_eval.yaml), e.g. max_new_tokens=96")
    p.add_argument("--splits", default="dev,test", help="evaluation splits, comma list (default dev,test)")
    p.add_argument("--dev-only", action="store_const", dest="splits", const="dev", help="= --splits dev (setting choices)")
    p.add_argument("--results", default="docs/results.md")
    p.add_argument("--plots", default="docs/results")
    p.add_argument("--archive", default="docs/runs", help="where finished runs are copied, under the --out folder's "
                   "name, and read back from when their folder is gone ('' : neither)")
    p.add_argument("--build", default=BUILD, help="a saved encoder + LLM restored before prep where the default "
                   "--encoder / --llm are missing, so runs pair with those archived (default %(default)s; '' : prepare anew)")
    p.add_argument("--save-build", metavar="DIR", help="save the prepared encoder + LLM to DIR (see --build) and exit")
    p.add_argument("--no-aggregate", action="store_true")
    p.add_argument("--baseline", default="joint", help="the systems every other one is paired with, seed by seed, "
                   "comma list (default joint)")
    p.add_argument("--aggregate-only", action="store_true",
                   help="tabulate the runs finished so far (e.g. while others still train); prepare and run nothing")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (OMP_NUM_THREADS; default 1: two threads per run on 2 shared cores "
                        "make a step up to 6x slower)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2: one per core with --threads 1)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = p.parse_args(argv)
    ENV["OMP_NUM_THREADS"] = str(a.threads)
    seeds, systems = parse_seeds(a.seeds), [s for s in a.systems.split(",") if s]
    baselines = tuple(s for s in a.baseline.split(",") if s)
    if unknown := {s.partition("@")[0] for s in systems + list(baselines)} - set(SYSTEMS + CONTROLS):
        p.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS + CONTROLS}")
    if not a.aggregate_only and (labels := [s for s in systems if "@" in s]):
        p.error(f"{labels}: SYSTEM@TAG names finished runs for --aggregate-only; make a variant with --tag and --set")
    out = ROOT / a.out  # subprocesses run in ROOT; an absolute --out stays as it is
    a.llm = a.llm or RECIPES[a.config][0]
    extra = ([*a.set] + ([f"pretrained.hf_llm={a.llm}"] if a.llm != RECIPES[a.config][0] else [])
             + ([f"pretrained.asr_encoder={a.encoder}"] if a.encoder != ENCODER else []))
    splits = [x for x in a.splits.split(",") if x]
    if unknown := set(splits) - set(SPLITS):
        p.error(f"unknown splits {sorted(unknown)}; choose from {sorted(SPLITS)}")
    archive = ROOT / a.archive / out.name if a.archive else None

    def archived(names) -> None:  # idempotent: also catches runs finished by an earlier process
        for n in names if archive else ():
            archive_run(out, n, archive)

    if a.save_build:
        print(save_build(ROOT / a.save_build, ROOT / a.encoder, ROOT / a.llm, a.config))
        return
    if a.aggregate_only:
        archived([run_name(s, seed, a.tag) for s in systems for seed in seeds])
        print(aggregate(out, systems, seeds, ROOT / a.results, ROOT / a.plots, a.tag, baselines, archive))
        return
    runs = [(s, seed, run_commands(s, seed, out, a.steps, extra, a.tag, splits, a.config, a.eval_set))
            for seed in seeds for s in systems]
    prep = prep_commands(systems, a.llm, a.encoder, a.config)
    if a.dry_run:
        for made, cmd in (item for stage in prep for item in stage):
            print(f"# unless {made} exists\n{shlex.join(cmd)}" if made else shlex.join(cmd))
        for s, seed, cmds in runs:
            for cmd in cmds.values():
                print(shlex.join(cmd))
        return
    t0 = time.time()

    def prep_one(item) -> None:  # a stage's commands are independent: they run side by side (--jobs)
        made, cmd = item
        print(f"prep: {shlex.join(cmd)}", flush=True)
        log = out / f"prep_{cmd[2].rsplit('.', 1)[-1]}.log"
        print(f"prep {cmd[2]} took {_run(cmd, log) / 60:.1f} min", flush=True)

    for i, stage in enumerate(prep):
        # the build goes in after the corpus and its tokenizer: a fresh corpus build replaces the whole folder
        if i == len(prep) - 1 and a.build and (ROOT / a.build / "build.json").exists() \
                and (a.encoder, a.llm) == (ENCODER, RECIPES[a.config][0]):
            for part in restore_build(ROOT / a.build, ROOT / a.encoder, ROOT / a.llm, a.config):
                print(f"prep: {part} restored from {a.build}", flush=True)
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(prep_one, [(made, cmd) for made, cmd in stage if not (made and (ROOT / made).exists())]))

    build = {"encoder": fingerprint(ROOT / a.encoder), "llm": fingerprint(ROOT / a.llm)}

    def one(run) -> str | None:
        s, seed, cmds = run
        try:
            timing = run_one(s, seed, out, cmds, a.tag, build)
            archived([run_name(s, seed, a.tag)])
        except RuntimeError as e:  # the other runs go on; rerunning resumes this one
            print(f"[{run_name(s, seed, a.tag)}] FAILED: {e}", flush=True)
            return run_name(s, seed, a.tag)
        print(f"[{run_name(s, seed, a.tag)}] " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timing.items()), flush=True)
        return None

    with ThreadPoolExecutor(a.jobs) as pool:  # seed-major order: one full seed of every system first
        failed = [name for name in pool.map(one, runs) if name]
    print(f"all runs done in {(time.time() - t0) / 60:.1f} min")
    if failed:
        sys.exit(f"failed runs (see their logs; rerun to resume): {', '.join(failed)}")
    if not a.no_aggregate:
        print(aggregate(out, systems, seeds, ROOT / a.results, ROOT / a.plots, a.tag, baselines, archive))


if __name__ == "__main__":
    main()
