"""The reproduction's cheap logic: the mean ± std table and plots from metrics.json folders, the dry-run command
list, and a tiny ``pretrain_llm`` folder that ``JSTIPModel`` loads through the repro recipe's ``init_from_hf``."""
import functools
import importlib.util
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nemo_jstip.metrics import summarize
from nemo_jstip.parallel.dist import spawn

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)


def repro_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="jstip_repro", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def _metrics(wer: float, med: float, bank: float, qa: float) -> dict:
    return {"wer": wer, "entity_accuracy": (med + bank) / 2, "num_utterances": 400, "num_qa": 69,
            "qa_accuracy": qa, "qa_text_accuracy": 1.0,
            "entity_accuracy_by_seen_in_text": {"True": med, "False": 0.0},
            "domains": {"general": {"wer": wer, "entity_accuracy": None},
                        "medical": {"wer": wer, "entity_accuracy": med},
                        "banking": {"wer": wer, "entity_accuracy": bank}}}


def _finished_runs(out: Path) -> None:
    """Evaluated runs as reproduce.py leaves them: seeds 1-2 of asr_only, seed 1 of jstip_mixed (seed 2 unfinished)."""
    fake = {("asr_only", 1): _metrics(0.5, 0.1, 0.2, 0.0), ("asr_only", 2): _metrics(0.3, 0.3, 0.2, 0.0),
            ("jstip_mixed", 1): _metrics(0.2, 0.6, 0.4, 0.5)}
    for (system, seed), m in fake.items():
        d = out / reproduce.run_name(system, seed) / "eval_test"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(m))
        (d.parent / "timing.json").write_text(json.dumps({"train": 240.0, "eval_test": 60.0}))


def _decoded_run(d: Path, ref: list[tuple], hyps: list[str]) -> None:
    """An evaluation folder as jstip_eval leaves it: hypotheses of the (domain, reference, entity) cuts + metrics."""
    d.mkdir(parents=True)
    rows = [{"cut_id": f"c{i}", "reference": r, "hypothesis": h, "domain": dom,
             "entities": [{"text": e, "type": "x"}] if e else []} for i, ((dom, r, e), h) in enumerate(zip(ref, hyps))]
    (d / "hypotheses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "metrics.json").write_text(json.dumps(summarize(rows)))


def test_aggregate_mean_std_table_and_plots(tmp_path):
    out = tmp_path / "runs"
    _finished_runs(out)
    results = tmp_path / "docs" / "results.md"
    results.parent.mkdir()
    results.write_text("# Results\n\nhand-written reading\n")
    for _ in range(2):  # a rerun replaces the generated block and keeps the rest
        reproduce.aggregate(out, ["asr_only", "jstip_mixed"], [1, 2], results, tmp_path / "docs" / "results")
    text = results.read_text()
    assert text.count(reproduce.BEGIN) == 1 and "hand-written reading" in text
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    head = rows["system"]
    asr, jstip = rows["asr_only"], rows["jstip_mixed"]
    assert asr[head.index("seeds")] == "2" and jstip[head.index("seeds")] == "1"
    assert asr[head.index("WER %")] == "40.0 ± 14.1"  # mean and sample std of 50 and 30
    assert asr[head.index("medical entity acc %")] == "20.0 ± 14.1"
    assert jstip[head.index("spoken QA %")] == "50.0"  # one seed: no std
    assert asr[-1].strip(" |") == "5.0"  # minutes per run
    mean = json.loads((out / "mean_test" / "asr_only" / "metrics.json").read_text())
    assert mean["wer"] == pytest.approx(0.4) and mean["domains"]["general"]["entity_accuracy"] is None
    assert (tmp_path / "docs" / "results" / "test" / "entity_accuracy.png").stat().st_size > 0
    assert (tmp_path / "docs" / "results" / "test" / "qa_accuracy.png").exists()


def test_aggregate_only_runs_nothing(monkeypatch, tmp_path):
    """--aggregate-only tabulates the finished runs while the unfinished one is neither prepared nor trained."""
    _finished_runs(tmp_path / "runs")
    monkeypatch.setattr(reproduce, "_run", lambda cmd, log: pytest.fail(f"ran {cmd}"))
    reproduce.main(["--seeds", "2", "--systems", "asr_only,jstip_mixed", "--out", str(tmp_path / "runs"),
                    "--results", str(tmp_path / "results.md"), "--plots", str(tmp_path / "plots"), "--aggregate-only",
                    "--archive", ""])
    text = (tmp_path / "results.md").read_text()
    assert "| asr_only | 2 | 40.0 ± 14.1 |" in text and "| jstip_mixed | 1 | 20.0 |" in text
    assert not (tmp_path / "runs" / "train").exists()


def test_paired_table_compares_each_seed_with_the_baseline(tmp_path):
    """Per-seed differences against joint (same seed) and the mentions only one of the pair gets, pooled over seeds."""
    ref = [("medical", "give metformin now", "metformin"), ("banking", "pay chase today", "chase"),
           ("general", "hello there", None)]
    hyps = {("joint", 1): ["give metformin now", "pay chess today", "hello there"],
            ("jstip_word", 1): ["give metformin now", "pay chase today", "hello here"],
            ("joint", 2): ["give met for min now", "pay chess today", "hello there"],
            ("jstip_word", 2): ["give metformin now", "pay chase today", "hello there"],
            ("jstip_word", 3): ["give metformin now", "pay chase today", "hello there"],  # no joint seed 3: unpaired
            ("jstip_word@w15", 1): ["give metformin now", "pay chess today", "hello there"]}  # a --tag w15 variant
    for (system, seed), hs in hyps.items():
        _decoded_run(tmp_path / reproduce.run_name(system, seed) / "eval_test", ref, hs)
    text = reproduce.paired_table(tmp_path, ["joint", "jstip_word"], [1, 2, 3], "test", "joint")
    head, _, row = text.splitlines()
    cells = dict(zip(head.strip("| ").split(" | "), row.strip("| ").split(" | ")))
    assert cells["system"] == "jstip_word" and cells["seeds"] == "2" and cells["seeds ahead"] == "2 of 2"
    assert cells["Δ entity acc pp"] == "75.0 ± 35.4"  # +50 (seed 1) and +100 (seed 2) points
    assert cells["mentions only it / only the baseline gets"] == "3 / 0" and cells["McNemar p (pooled)"] == "0.25"
    assert cells["McNemar p per seed"] == "1, 0.5" and cells["Δ general WER pp"] == "25.0 ± 35.4"
    assert reproduce.paired_table(tmp_path, ["jstip_word"], [1, 2], "dev", "joint") == ""
    variant = reproduce.paired_table(tmp_path, ["jstip_word@w15"], [1, 2], "test", "joint").splitlines()[-1]
    assert (tmp_path / "jstip_word_w15_s1").is_dir() and variant.startswith("| jstip_word@w15 | 1 | 0.0 | 0 of 1 |")
    results = tmp_path / "results.md"
    reproduce.main(["--seeds", "1,2,3", "--systems", "joint,jstip_word", "--baseline", "joint,jstip_word", "--out",
                    str(tmp_path), "--results", str(results), "--plots", str(tmp_path / "plots"), "--aggregate-only",
                    "--archive", str(tmp_path / "archive")])
    generated = results.read_text()  # one paired table per baseline: the reverse pairing mirrors the mentions
    assert f"Paired with joint (same seed):\n\n{text}" in generated
    assert "Paired with jstip_word (same seed):" in generated
    assert "| joint | 2 | -75.0 ± 35.4 | 0 of 2 | 0 / 3 |" in generated
    with pytest.raises(SystemExit):  # an unknown baseline is refused before anything is written
        reproduce.main(["--systems", "joint", "--baseline", "jointt", "--out", str(tmp_path), "--results",
                        str(tmp_path / "other.md"), "--aggregate-only"])
    assert not (tmp_path / "other.md").exists()
    with pytest.raises(SystemExit):  # a SYSTEM@TAG label only tabulates: a variant is trained with --tag and --set
        reproduce.main(["--systems", "jstip_word@w15", "--out", str(tmp_path), "--dry-run"])


def test_archive_keeps_runs_for_a_fresh_checkout(tmp_path):
    """Finished runs are copied (hypotheses gzipped, byte-identical on a rerun); once their folders are gone the tables
    read the copies; runs trained on different encoder builds are not paired."""
    out, archive = tmp_path / "repro_6k", tmp_path / "archive"
    ref = [("medical", "give metformin now", "metformin"), ("general", "hello there", None)]
    hyps = {("joint", 1, "e1"): ["give met for min now", "hello there"], ("jstip_word", 1, "e1"): ["give metformin now", "hello"],
            ("joint", 2, "e1"): ["give met for min now", "hello there"], ("jstip_word", 2, "e2"): ["give metformin now", "hello"]}
    for (system, seed, enc), hs in hyps.items():
        d = out / reproduce.run_name(system, seed)
        _decoded_run(d / "eval_dev", ref, hs)
        (d / "build.json").write_text(json.dumps({"encoder": enc, "llm": "l1"}))
        (d / "timing.json").write_text(json.dumps({"train": 60.0, "eval_dev": 6.0}))
    before = reproduce.paired_table(out, ["jstip_word"], [1, 2], "dev", "joint")
    assert reproduce.archive_run(out, "joint_s1", archive) and not reproduce.archive_run(out, "asr_only_s1", archive)
    gz = (archive / "joint_s1" / "eval_dev" / "hypotheses.jsonl.gz").read_bytes()
    reproduce.main(["--seeds", "1,2", "--systems", "joint,jstip_word", "--out", str(out), "--aggregate-only", "--dev-only",
                    "--archive", str(archive), "--results", str(tmp_path / "a.md"), "--plots", str(tmp_path / "p")])
    assert (archive / "repro_6k" / "joint_s1" / "eval_dev" / "hypotheses.jsonl.gz").read_bytes() == gz
    assert json.loads((archive / "repro_6k" / "jstip_word_s2" / "build.json").read_text())["encoder"] == "e2"
    for d in out.glob("*_s*"):  # a fresh checkout: only the committed copies are left
        shutil.rmtree(d)
    kept = archive / "repro_6k"
    after = reproduce.paired_table(out, ["jstip_word"], [1, 2], "dev", "joint", archive=kept)
    assert after == before and "| jstip_word | 1 | 100.0 | 1 of 1 | 1 / 0 |" in after
    assert "(1 seeds not paired: trained on different encoder / LLM builds)" in after
    assert reproduce.paired_table(out, ["jstip_word"], [1, 2], "dev", "joint") == ""
    assert list(reproduce.collect(out, ["joint", "jstip_word"], [1, 2], "dev", archive=kept)) == ["joint", "jstip_word"]
    assert reproduce.fingerprint(tmp_path / "missing.nemo") is None
    weights = tmp_path / "model_weights.ckpt"
    prints = []
    for mtime, content in ((1, b"w1"), (2, b"w1"), (3, b"w2")):  # a .nemo saved again: same weights, new tar times
        weights.write_bytes(content)
        os.utime(weights, (mtime, mtime))
        with tarfile.open(tmp_path / f"enc{mtime}.nemo", "w") as tar:
            tar.add(weights, arcname="model_weights.ckpt")
        prints.append(reproduce.fingerprint(tmp_path / f"enc{mtime}.nemo"))
    assert prints[0] == prints[1] != prints[2]


def test_saved_build_is_restored_only_where_missing_and_checked(tmp_path):
    """A committed build puts the exact encoder and LLM back on a fresh checkout (no replay text, which pretrain_llm
    rewrites), never over prepared ones nor into another recipe, and a damaged copy stops the run by name."""
    enc, llm = tmp_path / "corpus" / "asr_ctc" / "asr_ctc.nemo", tmp_path / "corpus" / "llm"
    enc.parent.mkdir(parents=True)
    llm.mkdir()
    (tmp_path / "model_weights.ckpt").write_bytes(b"encoder weights")
    with tarfile.open(enc, "w") as tar:
        tar.add(tmp_path / "model_weights.ckpt", arcname="model_weights.ckpt")
    (enc.parent / "pretrain.json").write_text("{}")
    for name, data in (("model.safetensors", b"llm weights"), ("config.json", b"{}"), ("replay_general.jsonl", b"x")):
        (llm / name).write_bytes(data)
    build = tmp_path / "build"
    record = reproduce.save_build(build, enc, llm)
    assert record == {"config": "jstip_repro", "encoder": reproduce.fingerprint(enc), "llm": reproduce.fingerprint(llm)}
    assert not (build / "llm" / "replay_general.jsonl").exists()

    fresh = tmp_path / "fresh"
    f_enc, f_llm = fresh / "asr_ctc" / "renamed.nemo", fresh / "llm"
    assert reproduce.restore_build(build, f_enc, f_llm, "jstip_smollm2") == [] and not fresh.exists()
    assert reproduce.restore_build(build, f_enc, f_llm) == ["encoder", "llm"]
    assert (reproduce.fingerprint(f_enc), reproduce.fingerprint(f_llm)) == (record["encoder"], record["llm"])
    assert (f_enc.parent / "pretrain.json").exists() and (f_llm / "config.json").exists()
    (f_llm / "model.safetensors").write_bytes(b"retrained")  # prepared here: kept
    assert reproduce.restore_build(build, f_enc, f_llm) == []
    assert (f_llm / "model.safetensors").read_bytes() == b"retrained"

    (build / "llm" / "model.safetensors").write_bytes(b"version https://git-lfs")  # a damaged copy
    shutil.rmtree(f_llm)
    with pytest.raises(SystemExit, match=r"build/llm: fingerprint \w+ is not build.json's"):
        reproduce.restore_build(build, f_enc, f_llm)
    assert not (f_llm / "model.safetensors").exists()


def test_dry_run_lists_every_command(capsys):
    reproduce.main(["--dry-run", "--seeds", "2", "--systems", "asr_only,jstip_synthetic", "--steps", "7"])
    lines = capsys.readouterr().out.splitlines()
    cmds = [line for line in lines if not line.startswith("#")]
    assert "nemo_jstip.prep.corpus out_dir=data/demo_corpus" in cmds[0] and "nemo_jstip.prep.tokenizer" in cmds[1]
    assert "benchmarks.repro.pretrain_llm" in cmds[2] and "benchmarks.repro.pretrain_encoder" in cmds[3]
    assert "sizes.medical_textspeech" in cmds[4]
    train = [c for c in cmds if "jstip_train.py" in c]
    evals = [c for c in cmds if "jstip_eval.py" in c]
    assert len(train) == 4 and len(evals) == 8  # 2 systems x 2 seeds, each evaluated on dev and test
    assert all("trainer.max_steps=7" in c and "--config-name jstip_repro" in c for c in train)
    assert sum("seed=2 " in c for c in train) == 2
    assert [("data.corpus_dir=" in c) for c in train] == [False, True, False, True]
    assert all("qa_test_cuts" in c for c in evals if "eval_test" in c)
    assert reproduce.parse_seeds("3") == [1, 2, 3] and reproduce.parse_seeds("4,9") == [4, 9]
    assert reproduce.parse_seeds("4,") == [4]
    reproduce.main(["--dry-run", "--seeds", "1", "--systems", "joint", "--config", "jstip_smollm2", "--splits", "test",
                    "--eval-set", "max_new_tokens=96"])
    cmds = capsys.readouterr().out.splitlines()
    assert "benchmarks.repro.hf_llm out_dir=data/smollm2" in cmds[2] and not any("pretrain_llm" in c for c in cmds)
    assert "--config-name jstip_smollm2" in next(c for c in cmds if "jstip_train.py" in c)
    (evaluation,) = [c for c in cmds if "jstip_eval.py" in c]
    assert "eval_test" in evaluation and evaluation.endswith("max_new_tokens=96")
    reproduce.main(["--dry-run", "--seeds", "2,", "--systems", "jstip_word", "--tag", "v", "--set", "a.b=1", "--set",
                    "+c.d=2", "e=3"])  # repeated --set flags add up
    (train,) = [c for c in capsys.readouterr().out.splitlines() if "jstip_train.py" in c]
    assert "name=jstip_word_v_s2 " in train and train.endswith("a.b=1 +c.d=2 e=3")
    with pytest.raises(SystemExit):
        reproduce.main(["--dry-run", "--splits", "train"])


def test_recipe_llm_matches_pretrain_defaults():
    from nemo_jstip.modules.hf_import import llm_config_from_hf
    from benchmarks.repro.pretrain_llm import PretrainConfig, hf_config

    class Tok:  # what hf_config reads of the tokenizer
        bos_token_id, eos_token_id, pad_token_id = 0, 1, 1

        def __len__(self):
            return 1003

    expected = llm_config_from_hf(hf_config(PretrainConfig(), Tok()))
    llm = OmegaConf.to_container(repro_cfg().model.llm)
    for key, value in llm.items():
        if key not in ("init_from_hf", "train_mode", "layer_spec"):
            assert getattr(expected, key) == value, key


def _load_from_hf(model_cfg: dict, hf_dir: str) -> dict:
    """Rank body: JSTIPModel from the recipe's model section; its GPT must hold the HF weights."""
    from safetensors.torch import load_file

    from nemo_jstip.models.jstip_model import JSTIPModel
    from nemo_jstip.parallel.dist import init_parallel

    init_parallel(seed=0)
    model = JSTIPModel(OmegaConf.create(model_cfg))
    hf = load_file(f"{hf_dir}/model.safetensors")
    emb = model.stage.gpt.embedding.word_embeddings.weight
    vocab = hf["model.embed_tokens.weight"].shape[0]
    return {"embedding_equal": torch.equal(emb[:vocab], hf["model.embed_tokens.weight"]),
            "head_equal": torch.equal(model.stage.gpt.output_layer.weight[:vocab], hf["lm_head.weight"]),
            "tokens": len(model.tokenizer), "vocab": vocab}


def test_tiny_pretrain_loads_via_init_from_hf(tiny_corpus, tmp_path):
    from lhotse import CutSet
    from transformers import AutoConfig

    from nemo_jstip.modules.hf_import import llm_config_from_hf
    from nemo_jstip.prep import tokenizer
    from benchmarks.repro.pretrain_llm import PretrainConfig, corpus_lines, split_heldout
    from benchmarks.repro.pretrain_llm import main as pretrain_main

    corpus = tmp_path / "corpus"
    corpus.symlink_to(tiny_corpus)
    tokenizer.main([f"corpus_dir={corpus}", "vocab_size=300", f"out_dir={tmp_path / 'tok'}"])
    llm_dir = tmp_path / "llm"
    args = [f"corpus_dir={corpus}", f"tokenizer={tmp_path / 'tok'}", f"out_dir={llm_dir}", "steps=3", "num_layers=2",
            "hidden_size=32", "ffn_hidden_size=64", "extra_general=40", "qa_repeats=1", "batch_size=8", "warmup=1"]
    result = pretrain_main(args)
    assert result["heldout_ppl"] > 1 and (llm_dir / "pretrain.json").exists()
    # replay_{general,qa}.jsonl: the lines the LLM trained on, never a held-out or a domain line
    def replay(src):
        return [json.loads(x)["text"] for x in (llm_dir / f"replay_{src}.jsonl").read_text().splitlines()]
    cfg = PretrainConfig(corpus_dir=str(corpus), extra_general=40, qa_repeats=1)
    train, held = split_heldout(corpus_lines(corpus, 40, 1, 0), cfg.heldout, cfg.seed)
    assert replay("general") == train["general"] and replay("qa") == train["qa"] and sorted(llm_dir.glob("replay*")) == \
        [llm_dir / f"replay_{s}.jsonl" for s in ("general", "general_new", "qa")]
    assert not set(replay("general")) & set(held["general"]) and all("\nAnswer: " in x for x in replay("qa"))
    # general_new: the general training lines that are not ASR transcripts (the 40 generated, but held-out ones)
    heard = {c.supervisions[0].text for c in CutSet.from_file(corpus / "general_train_cuts.jsonl")}
    assert replay("general_new") == [x for x in train["general"] if x not in heard] and replay("general_new")
    (llm_dir / "replay_qa.jsonl").unlink()  # a folder from before the files existed gets them when reused
    (llm_dir / "replay_general_new.jsonl").unlink()
    pretrain_main(args)
    assert replay("qa") == train["qa"] and replay("general_new") and not set(replay("general_new")) & heard
    # reproduce.py runs both steps every time: a current folder is reused, a stale one rebuilt
    stamp = (llm_dir / "model.safetensors").stat().st_mtime_ns
    assert pretrain_main(args)["tokenizer_sha"] == result["tokenizer_sha"]
    assert (llm_dir / "model.safetensors").stat().st_mtime_ns == stamp
    tokenizer.main([f"corpus_dir={corpus}", "vocab_size=280", f"out_dir={tmp_path / 'tok'}"])
    assert len(json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["vocab"]) == 280
    assert pretrain_main([*args, "log_every=2"])["tokenizer_sha"] != result["tokenizer_sha"]  # retrained
    tokenizer.main([f"corpus_dir={corpus}", "vocab_size=300", f"out_dir={tmp_path / 'tok'}"])
    result = pretrain_main(args)
    (llm_dir / "pretrain.json").rename(tmp_path / "pretrain.json")  # an LLM from elsewhere: never overwritten
    stamp = (llm_dir / "model.safetensors").stat().st_mtime_ns
    assert pretrain_main([*args, "steps=4"]) == {} and (llm_dir / "model.safetensors").stat().st_mtime_ns == stamp
    (tmp_path / "pretrain.json").rename(llm_dir / "pretrain.json")
    llm = llm_config_from_hf(AutoConfig.from_pretrained(str(llm_dir)))
    sizes = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels")
    cfg = repro_cfg(f"pretrained.hf_llm={llm_dir}", f"data.corpus_dir={corpus}", "model.llm.layer_spec=local",
                    "model.perception.init_from_nemo=null",  # the encoder has its own test below
                    *[f"model.llm.{k}={getattr(llm, k)}" for k in sizes])
    (out,) = spawn(_load_from_hf, 1, OmegaConf.to_container(cfg.model), str(llm_dir), timeout_s=120)
    assert out["embedding_equal"] and out["head_equal"]
    assert out["tokens"] == out["vocab"]  # the saved tokenizer already has JSTIP's special tokens


def _perception_from_asr(model_cfg: dict, asr_nemo: str) -> dict:
    from nemo_jstip.models.jstip_model import JSTIPModel
    from nemo_jstip.parallel.dist import init_parallel

    init_parallel(seed=0)
    model = JSTIPModel(OmegaConf.create(model_cfg))
    from nemo.collections.asr.models import EncDecCTCModel

    asr = EncDecCTCModel.restore_from(asr_nemo, map_location="cpu")
    ours, theirs = model.stage.perception.encoder.state_dict(), asr.encoder.state_dict()
    return {"equal": ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)}


def test_tiny_encoder_pretrain_loads_via_init_from_nemo(tiny_corpus, tmp_path):
    """The CTC-pretrained encoder: NeMo's EncDecCTCModel on general train cuts, dev sets scored, loaded into the
    repro recipe's perception by ``model.perception.init_from_nemo`` (the recipe's default path)."""
    from nemo_jstip.prep import tokenizer
    from benchmarks.repro.pretrain_encoder import main as pretrain_main

    tokenizer.main([f"corpus_dir={tiny_corpus}", "vocab_size=300", f"out_dir={tmp_path / 'tok'}"])
    out = tmp_path / "asr" / "asr_ctc.nemo"
    report = pretrain_main([f"corpus_dir={tiny_corpus}", f"out={out}", "steps=4", "batch_duration=10", "warmup=1",
                            "num_workers=0"])
    assert out.exists() and (out.parent / "pretrain.json").exists()
    assert set(report["dev"]) == {"general_dev", "medical_dev", "banking_dev"}
    assert all(0 <= m["cer"] and m["wer"] >= 0 for m in report["dev"].values())
    cfg = repro_cfg(f"pretrained.asr_encoder={out}", f"data.corpus_dir={tiny_corpus}", "model.llm.layer_spec=local",
                    "model.llm.init_from_hf=null", f"model.tokenizer.path={tmp_path / 'tok'}")
    assert cfg.model.perception.init_from_nemo == str(out)
    (res,) = spawn(_perception_from_asr, 1, OmegaConf.to_container(cfg.model), str(out), timeout_s=120)
    assert res["equal"]


def test_runs_go_on_when_one_fails(monkeypatch, tmp_path, capsys):
    """--jobs runs several at a time; a failed run is reported at the end and does not stop the others."""
    done = []

    def fake_run_one(system, seed, out, cmds, tag="", build=None):
        if system == "joint":
            raise RuntimeError("exit 1: boom")
        done.append((system, seed))
        return {"train": 1.0}

    monkeypatch.setattr(reproduce, "run_one", fake_run_one)
    monkeypatch.setattr(reproduce, "_run", lambda cmd, log: 0.0)  # prep: nothing to build
    with pytest.raises(SystemExit, match="joint_s1, joint_s2"):
        reproduce.main(["--seeds", "2", "--systems", "asr_only,joint,jstip_word", "--jobs", "2",
                        "--out", str(tmp_path), "--no-aggregate", "--archive", str(tmp_path / "archive"),
                        "--encoder", str(tmp_path / "enc.nemo"), "--llm", str(tmp_path / "llm")])
    assert sorted(done) == [("asr_only", 1), ("asr_only", 2), ("jstip_word", 1), ("jstip_word", 2)]
    assert "[joint_s1] FAILED: exit 1: boom" in capsys.readouterr().out
    assert not (tmp_path / "enc.nemo").exists()  # the committed build goes to the default inputs only


def test_timing_survives_a_failed_attempt(monkeypatch, tmp_path):
    """timing.json is written while a step runs; a rerun adds its time to that of the attempt that died."""
    monkeypatch.setattr(reproduce, "_run", functools.partial(reproduce._run, tick_s=0.05))
    dies = {"train": [sys.executable, "-c", "import time, sys; time.sleep(0.5); sys.exit(1)"]}
    with pytest.raises(RuntimeError, match="exit 1"):
        reproduce.run_one("joint", 1, tmp_path, dies)
    first = json.loads((tmp_path / "joint_s1" / "timing.json").read_text())["train"]
    assert 0.2 < first < 5.0
    works = {"train": [sys.executable, "-c", "import time; time.sleep(0.3)"]}
    total = reproduce.run_one("joint", 1, tmp_path, works)["train"]
    assert total >= first + 0.3 and json.loads((tmp_path / "joint_s1" / "timing.json").read_text())["train"] == total
    assert "import time; time.sleep(0.3)" in (tmp_path / "joint_s1" / "train.log").read_text()
