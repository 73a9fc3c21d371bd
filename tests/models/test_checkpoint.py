"""The .nemo format: saved from a TP x PP run, restored at other layouts with the same loss; and a stranger's
malicious .nemo executes nothing and writes nothing outside its extraction folder."""

import io
import pickle
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


# ------------------------------------------------------------------ malicious files
class _Boom:
    def __reduce__(self):
        import os

        return os.system, ("touch PWNED",)


def _rewrite(nemo_src, nemo_dst, replace: dict[str, bytes], extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()):
    """Copy a .nemo, replacing the bytes of members whose name ends with a key, and appending ``extra`` members."""
    with tarfile.open(nemo_src) as src, tarfile.open(nemo_dst, "w:") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            for suffix, new in replace.items():
                if m.name.endswith(suffix):
                    data, m.size = new, len(new)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
        for m, data in extra:
            dst.addfile(m, io.BytesIO(data) if data is not None else None)


@pytest.fixture(scope="module")
def good_nemo(parallel_setup, tmp_path_factory):
    path = tmp_path_factory.mktemp("nemo") / "good.nemo"
    spawn(save_or_restore, 1, parallel_setup, str(path), 1, 1, True)
    return path


def restore_in_process(nemo, cwd):
    """Rank body: restore in ``cwd``; the error's type and message, or None."""
    import os

    from nemo_jstip.models.jstip_model import JSTIPModel

    os.chdir(cwd)
    try:
        JSTIPModel.restore_from(str(nemo))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _member(name, data: bytes | None = b"x", kind=tarfile.REGTYPE, linkname=""):
    m = tarfile.TarInfo(name)
    m.type, m.size, m.linkname = kind, len(data) if data is not None else 0, linkname
    return m, data


@pytest.mark.parametrize("attack", ["metadata_pickle", "common_pt", "config_target", "path_traversal", "symlink"])
def test_malicious_nemo_is_refused(good_nemo, tmp_path, attack):
    bad = tmp_path / "bad.nemo"
    boom = pickle.dumps(_Boom())
    if attack == "metadata_pickle":  # DCP metadata is a pickle: the classic code-execution vector
        _rewrite(good_nemo, bad, {".metadata": boom})
    elif attack == "common_pt":  # Megatron's common state: a torch.save pickle
        buf = io.BytesIO()
        torch.save({"x": _Boom()}, buf)
        _rewrite(good_nemo, bad, {}, [_member("./model_weights/common.pt", buf.getvalue())])
    elif attack == "config_target":
        with tarfile.open(good_nemo) as t:
            yaml = t.extractfile("./model_config.yaml").read().decode()
        yaml = "\n".join(l for l in yaml.splitlines() if not l.startswith("target:")) + "\ntarget: os.system\n"
        _rewrite(good_nemo, bad, {"model_config.yaml": yaml.encode()})
    elif attack == "path_traversal":
        _rewrite(good_nemo, bad, {}, [_member(f"../../{tmp_path.name}/escaped.txt")])
    else:
        _rewrite(good_nemo, bad, {}, [_member("./link", None, tarfile.SYMTYPE, linkname=str(tmp_path / "target"))])
    work = tmp_path / "cwd"
    work.mkdir()
    (error,) = spawn(restore_in_process, 1, bad, str(work))
    assert error is not None and "UnsafeCheckpointError" in error, error
    assert "bad.nemo" in error  # names the file
    assert not (work / "PWNED").exists() and not list(tmp_path.rglob("PWNED")) and not list(tmp_path.rglob("escaped.txt"))


def test_good_nemo_restores(good_nemo, tmp_path):
    (error,) = spawn(restore_in_process, 1, good_nemo, str(tmp_path))
    assert error is None


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
    return {"hf_embedding": from_hf.stage.gpt.embedding.word_embeddings.weight.detach().clone(),
            "loss": from_nemo.loss(data["batches"])["loss"]}


def test_init_from_hf_folder_and_from_nemo(parallel_setup, good_nemo, tmp_path):
    import transformers as T

    from tests.models.conftest import HF_SIZES

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

