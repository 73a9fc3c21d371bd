"""The example scripts end to end, as a user runs them: train a few steps, save the .nemo, evaluate it at TP=2."""
import json
import subprocess
import sys
from pathlib import Path

from lhotse import CutSet

from nemo_jstip.prep.tokenizer import main as make_tokenizer

ROOT = Path(__file__).parents[1]
TINY = [
    "model.llm.num_layers=2", "model.llm.hidden_size=64", "model.llm.ffn_hidden_size=128",
    "model.perception.encoder.n_layers=2", "model.perception.encoder.d_model=64",
    "model.perception.encoder.subsampling_conv_channels=64", "model.perception.adapter.hidden_size=64",
]


def run(args, cwd):
    out = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout


def test_train_save_evaluate(tiny_corpus, tmp_path):
    make_tokenizer([f"corpus_dir={tiny_corpus}", "vocab_size=300"])
    nemo = tmp_path / "tiny.nemo"
    run([str(ROOT / "examples/jstip_train.py"), f"data.corpus_dir={tiny_corpus}", f"exp_manager.exp_dir={tmp_path}",
         f"model_out={nemo}", "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
         "model.train_ds.loader.num_workers=0", "model.train_ds.sampler.max_tokens=1024", "trainer.log_every_n_steps=1",
         *TINY], tmp_path)
    assert nemo.exists()
    manifests = [tiny_corpus / "medical_test_cuts.jsonl", tiny_corpus / "qa_test_cuts.jsonl"]
    # restored at another layout: TP=2 on two processes (torchrun), decoding the same batches
    out = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "examples/jstip_eval.py"),
               "tensor_model_parallel_size=2", f"model={nemo}", f"data.manifest=[{','.join(map(str, manifests))}]",
               f"output_dir={tmp_path / 'eval'}", "max_new_tokens=4", "qa.max_new_tokens=4", f"log_dir={tmp_path}"],
              tmp_path)
    assert "| medical |" in out and "## Zero-shot spoken QA" in out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"wer", "entity_accuracy", "num_utterances"} <= set(metrics) and "medical" in metrics["domains"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "hypotheses.jsonl").read_text().splitlines()]
    assert sorted(r["cut_id"] for r in rows) == sorted(i for m in manifests for i in CutSet.from_file(m).ids)
    assert all({"cut_id", "reference", "hypothesis"} <= set(r) for r in rows)
    assert metrics["num_utterances"] == len(rows)
    qa = [r for r in rows if r["domain"] == "qa"]
    assert metrics["num_qa"] == len(qa) == len(CutSet.from_file(manifests[1]))
    assert all({"question", "answers", "answer", "answer_text"} <= set(r) for r in qa)
    assert 0 <= metrics["qa_accuracy"] <= 1 and 0 <= metrics["qa_text_accuracy"] <= 1
    for png in ("entity_accuracy.png", "loss.png", "qa_accuracy.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 0 and f"({png})" in out


def test_train_from_released_models_then_export(tiny_corpus, tmp_path):
    """docs/recipes.md, "From released models": the tiny recipe with its encoder from a FastConformer CTC .nemo
    (80 mels, rel_pos, xscaling, untie_biases, full context) and its LLM and tokenizer from a Qwen3-shaped HF folder,
    their YAML sections removed, trains; the saved .nemo's config carries that encoder and LLM; jstip_to_hf.py exports
    it, transformers loads the LLM folder as it is, and NeMo's generic loader restores the .nemo."""
    import tarfile

    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.modules.test_pretrained import FASTCONFORMER, asr_nemo, hf_folder

    asr_nemo("ctc", tmp_path / "fastconformer.nemo")
    hf_folder("qwen3", tmp_path / "qwen3")
    nemo = tmp_path / "tiny.nemo"
    run([str(ROOT / "examples/jstip_train.py"), f"data.corpus_dir={tiny_corpus}", f"exp_manager.exp_dir={tmp_path}",
         f"model_out={nemo}", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
         "model.train_ds.loader.num_workers=0", "model.train_ds.sampler.max_tokens=1024",
         f"++model.perception.init_from_nemo={tmp_path / 'fastconformer.nemo'}", "~model.perception.preprocessor",
         "~model.perception.encoder", "~model.llm", f"+model.llm.init_from_hf={tmp_path / 'qwen3'}",
         "+model.llm.train_mode=lora", "~model.tokenizer", "model.perception.adapter.hidden_size=64"], tmp_path)
    with tarfile.open(nemo) as t:
        saved = yaml.safe_load(t.extractfile("./model_config.yaml"))
    for section in ("preprocessor", "encoder"):
        assert saved["perception"][section] == {k: v for k, v in FASTCONFORMER[section].items() if k != "_target_"}
    assert saved["llm"]["qk_layernorm"] and saved["llm"]["kv_channels"] == 32 and saved["llm"]["train_mode"] == "lora"
    out = tmp_path / "hf"
    run([str(ROOT / "examples/jstip_to_hf.py"), f"model={nemo}", f"output_dir={out}"], tmp_path)
    llm, tok = AutoModelForCausalLM.from_pretrained(out / "llm"), AutoTokenizer.from_pretrained(out / "llm")
    assert type(llm).__name__ == "Qwen3ForCausalLM" and "<|audio|>" in tok.get_vocab()
    with torch.no_grad():
        assert torch.isfinite(llm(tok("the patient", return_tensors="pt").input_ids).logits).all()
    generic = ("import nemo_jstip, sys; from nemo.core.classes import ModelPT; "
               "print(type(ModelPT.restore_from(sys.argv[1])).__name__)")
    assert run(["-c", generic, str(nemo)], tmp_path).split()[-1] == "JSTIPModel"
