"""Export to Hugging Face (examples/jstip_to_hf.py): the LLM folder loads with AutoModelForCausalLM/AutoTokenizer as it
is and gives the JSTIP model's text logits (LoRA merged); taken back with init_from_hf / init_from_nemo it gives the
same logits and encoder frames."""

import subprocess
import sys
from pathlib import Path

import torch

from nemo_jstip.parallel.dist import spawn

ROOT = Path(__file__).parents[2]
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
AUDIO, AUDIO_LENS = torch.randn(2, 16000, generator=torch.Generator().manual_seed(4)), torch.tensor([16000, 9000])


def outputs(model) -> dict:
    from nemo_jstip.modules.llm import gather_logits

    model.eval()
    pos = torch.arange(IDS.shape[1]).expand_as(IDS)
    with torch.no_grad():
        logits = gather_logits(model.stage.gpt(IDS, pos, None), model.llm_cfg.vocab_size)
        frames, _ = model.stage.perception(AUDIO, AUDIO_LENS)
    return {"logits": logits.cpu(), "frames": frames.cpu(), "vocab": len(model.tokenizer)}


def build_lora_and_save(setup_path, nemo_path) -> dict:
    """Rank body: the tiny model in LoRA mode with trained-looking adapters (B != 0), saved; its outputs."""
    from omegaconf import OmegaConf

    from nemo_jstip.models.jstip_model import JSTIPModel
    from nemo_jstip.parallel.dist import init_parallel

    init_parallel(seed=5)
    cfg = OmegaConf.create(torch.load(setup_path, weights_only=False)["cfg"])
    cfg.llm.train_mode = "lora"
    model = JSTIPModel(cfg)
    with torch.no_grad():
        for name, p in model.stage.gpt.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)
    model.save_to(nemo_path)
    return outputs(model)


def reimport(folder) -> dict:
    """Rank body: a new model from the exported parts alone (init_from_hf, init_from_nemo, the adapter's weights)."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from nemo_jstip.models.jstip_model import JSTIPModel
    from nemo_jstip.parallel.dist import init_parallel

    init_parallel(seed=6)
    perception = OmegaConf.load(f"{folder}/perception/perception.yaml")
    perception.init_from_nemo = f"{folder}/perception/encoder.nemo"
    cfg = OmegaConf.create({"llm": {"init_from_hf": f"{folder}/llm", "layer_spec": "local", "train_mode": "full"},
                            "perception": perception, "interleave": {"mode": "mixed"}})
    model = JSTIPModel(cfg)
    model.stage.perception.adapter.load_state_dict(load_file(f"{folder}/perception/adapter.safetensors"))
    return outputs(model)


def test_export_to_hf_and_back(parallel_setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    nemo, out = tmp_path / "lora.nemo", tmp_path / "export"
    (ours,) = spawn(build_lora_and_save, 1, parallel_setup, str(nemo))
    run = subprocess.run([sys.executable, str(ROOT / "examples/jstip_to_hf.py"), f"model={nemo}", f"output_dir={out}"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    parts = {p.name for p in (out / "perception").iterdir()}
    assert parts == {"encoder.nemo", "adapter.safetensors", "perception.yaml"}
    assert "perception/encoder.nemo" in (out / "README.md").read_text()
    hf = AutoModelForCausalLM.from_pretrained(out / "llm").eval()
    tok = AutoTokenizer.from_pretrained(out / "llm")
    assert len(tok) == ours["vocab"] and {"<|audio|>", "<|speech_start|>", "<|speech_end|>"} <= set(tok.get_vocab())
    assert not any("lora" in k for k in hf.state_dict())
    with torch.no_grad():
        theirs = hf(IDS).logits[..., : ours["logits"].shape[-1]]
    assert (theirs - ours["logits"]).abs().max() < 1e-4
    (back,) = spawn(reimport, 1, str(out))
    assert (back["logits"] - ours["logits"]).abs().max() < 1e-4
    torch.testing.assert_close(back["frames"], ours["frames"])
