"""The .nemo format: saved from a TP x PP run, restored at other layouts with the same loss; pretrained weights
named by the config. Malicious files: tests/test_checkpoint.py."""

import tarfile

import pytest
import torch

from nemo_jstip.parallel.dist import spawn
from tests.models.test_parallel import _build


def save_or_restore(setup_path, nemo_path, tp: int, pp: int, save: bool, manifest=None) -> dict:
    """Rank body: build at (tp, pp) from the shared setup and save, or restore the .nemo at (tp, pp); the loss,
    and with ``manifest`` the greedy transcripts of its cuts (PP=1)."""
    from megatron.core import parallel_state as ps

    from nemo_jstip.models.jstip_model import JSTIPModel
    from nemo_jstip.parallel.dist import init_parallel

    if save:
        model, batches = _build(setup_path, tp, pp)
        model.save_to(nemo_path)
    else:
        torch.set_num_threads(1)
        init_parallel(tp=tp, pp=pp, seed=99)  # different initial weights: the checkpoint must overwrite them all
        batches = torch.load(setup_path, weights_only=False)["batches"]
        model = JSTIPModel.restore_from(nemo_path)
    out = {"loss": model.loss(batches)["loss"], "pp_rank": ps.get_pipeline_model_parallel_rank()}
    if manifest is not None:
        from nemo_jstip.evaluate import transcribe

        out["hypotheses"] = {r["cut_id"]: r["hypothesis"] for r in transcribe(model, manifest, max_new_tokens=8)[0]}
    return out


def test_nemo_saved_at_tp2_pp2_restores_and_decodes_at_tp1_and_tp2(parallel_setup, tiny_corpus, tmp_path):
    nemo, manifest = str(tmp_path / "model.nemo"), str(tiny_corpus / "general_dev_cuts.jsonl")
    saved = spawn(save_or_restore, 4, parallel_setup, nemo, 2, 2, True, timeout_s=300)
    assert tarfile.is_tarfile(nemo) and not list(tmp_path.glob(".*"))  # staging and partial files are gone
    (one,) = spawn(save_or_restore, 1, parallel_setup, nemo, 1, 1, False, manifest)
    two = spawn(save_or_restore, 2, parallel_setup, nemo, 2, 1, False, manifest)
    for r in saved + two:
        assert r["loss"] == pytest.approx(one["loss"], abs=1e-5)
    assert len(one["hypotheses"]) == 4 and all(r["hypotheses"] == one["hypotheses"] for r in two)


def init_from_config(setup_path, nemo_path, hf_dir) -> dict:
    """Rank body: models whose config names pretrained weights (HF folder; a whole .nemo) start from them."""
    from omegaconf import OmegaConf

    from nemo_jstip.models.jstip_model import JSTIPModel
    from nemo_jstip.parallel.dist import init_parallel

    init_parallel(seed=7)
    data = torch.load(setup_path, weights_only=False)
    cfg = OmegaConf.create(data["cfg"])
    cfg.llm.init_from_hf = hf_dir
    from_hf = JSTIPModel(cfg)
    cfg.llm.init_from_hf, cfg.init_from_nemo = None, nemo_path
    from_nemo = JSTIPModel(cfg)
    return {"hf_embedding": from_hf.stage.gpt.embedding.word_embeddings.weight.detach().cpu().clone(),
            "loss": from_nemo.loss(data["batches"])["loss"]}


def test_init_from_hf_folder_and_from_nemo(parallel_setup, good_nemo, tmp_path):
    import transformers as T

    from tests.conftest import HF_SIZES

    data = torch.load(parallel_setup, weights_only=False)
    hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=data["hf"]["model.embed_tokens.weight"].shape[0],
                                          tie_word_embeddings=False, **HF_SIZES))
    hf.load_state_dict(data["hf"])
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    (out,) = spawn(init_from_config, 1, parallel_setup, str(good_nemo), str(tmp_path / "hf"))
    vocab = data["hf"]["model.embed_tokens.weight"]
    torch.testing.assert_close(out["hf_embedding"][: len(vocab)], vocab)
    (saved,) = spawn(save_or_restore, 1, parallel_setup, str(good_nemo), 1, 1, False)
    assert out["loss"] == pytest.approx(saved["loss"], abs=1e-6)



GENERIC = """
import sys, torch
import nemo_jstip
from nemo.core.classes import ModelPT
assert "nemo_jstip.models.jstip_model" not in sys.modules  # importing the package alone registers it with NeMo
batches = torch.load(sys.argv[2], weights_only=False)["batches"]
model = ModelPT.restore_from(sys.argv[1])
again = type(model).restore_from(sys.argv[1])
print(type(model).__name__, model.loss(batches)["loss"], again.loss(batches)["loss"])
"""


def test_nemo_generic_restore_returns_the_model(parallel_setup, good_nemo, tmp_path):
    """``import nemo_jstip`` then NeMo's ``ModelPT.restore_from`` (NeMo's own connector, which knows only
    ``model_weights.ckpt``) gives the JSTIPModel with the saved weights, as ``JSTIPModel.restore_from`` does."""
    import subprocess
    import sys

    with tarfile.open(good_nemo) as t:  # NeMo's layout: both weight members
        names = {m.name.lstrip("./") for m in t.getmembers()}
    assert {"model_config.yaml", "model_weights.ckpt", "model_weights/.metadata"} <= names
    out = subprocess.run([sys.executable, "-c", GENERIC, str(good_nemo), str(parallel_setup)], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    name, generic, direct = out.stdout.split()[-3:]
    (saved,) = spawn(save_or_restore, 1, parallel_setup, str(good_nemo), 1, 1, False)
    assert name == "JSTIPModel" and float(generic) == float(direct) == pytest.approx(saved["loss"], abs=1e-6)
