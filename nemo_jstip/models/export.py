"""A JSTIP model in the formats others load: the LLM as a Hugging Face folder, the speech side as NeMo parts.

``export_to_hf(model, out_dir)`` writes

- ``llm/``: ``config.json`` (Llama, Qwen2 or Qwen3, from the model's ``llm`` section), ``model.safetensors`` (LoRA
  merged), and the tokenizer with JSTIP's added tokens: ``AutoModelForCausalLM`` / ``AutoTokenizer`` load it as it is,
  and ``model.llm.init_from_hf`` takes it back;
- ``perception/encoder.nemo``: the preprocessor and encoder as a NeMo ASR .nemo holds them (``model_config.yaml``
  with their sections, ``model_weights.ckpt`` with ``preprocessor.*`` and ``encoder.*``), which
  ``model.perception.init_from_nemo`` takes back; ``perception/adapter.safetensors`` and ``perception/perception.yaml``
  (the whole perception section: ``SpeechPerception(cfg)`` loads both files);
- ``README.md``: how the parts fit.

It exports the model as it is in this process, one whole stage at TP = PP = 1 (``JSTIPModel.restore_from`` at TP=1
reads a .nemo saved at any layout): nothing is gathered across ranks.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from omegaconf import OmegaConf
from safetensors.torch import save_file

from nemo_jstip.data.examples import AUDIO_TOKEN
from nemo_jstip.modules.hf_import import hf_config, megatron_to_hf
from nemo_jstip.modules.llm import merged_state_dict
from nemo_jstip.modules.perception import _CLASSES

README = """# {name}: a JSTIP speech-LLM in parts

- `llm/`: the decoder as a Hugging Face {arch} (LoRA merged), with its tokenizer. Text in, text out:
  `AutoModelForCausalLM.from_pretrained("llm")`, `AutoTokenizer.from_pretrained("llm")`.
- `perception/encoder.nemo`: the NeMo preprocessor (`AudioToMelSpectrogramPreprocessor`) and encoder
  (`ConformerEncoder`): their config sections in `model_config.yaml`, their weights in `model_weights.ckpt`.
- `perception/adapter.safetensors`: the frame adapter (encoder frames, {stack} stacked, to the LLM's hidden size
  {hidden}); `perception/perception.yaml` is the whole perception config
  (`nemo_jstip.modules.perception.SpeechPerception`).

Speech in: audio (16 kHz mono) -> preprocessor -> encoder -> adapter gives one LLM input embedding per
{hop_ms:g} ms. The model saw each utterance's frames in place of the `{audio}` placeholder tokens, one per frame,
{markers}(docs/method.md, the sequence layouts). Text-only use needs `llm/` alone.

To train on from here: `model.llm.init_from_hf=llm model.perception.init_from_nemo=perception/encoder.nemo`.
"""


def export_to_hf(model, out_dir: str | Path) -> Path:
    """Write ``model`` (a ``JSTIPModel`` built at TP = PP = 1) as ``out_dir/llm``, ``out_dir/perception`` and
    ``out_dir/README.md`` (module docstring)."""
    if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("export runs on one process at TP=PP=1: restore the .nemo there (any saved layout loads)")
    out = Path(out_dir)
    (out / "llm").mkdir(parents=True, exist_ok=True)
    (out / "perception").mkdir(exist_ok=True)
    tok = model.tokenizer
    weights = megatron_to_hf([{k: v.cpu() for k, v in merged_state_dict(model.stage.gpt).items()}], model.llm_cfg)
    save_file({k: v.contiguous().clone() for k, v in weights.items()}, out / "llm" / "model.safetensors",
              metadata={"format": "pt"})
    ids = {f"{n}_token_id": getattr(tok, f"{n}_token_id") for n in ("bos", "eos", "pad")}
    config = hf_config(model.llm_cfg, **ids)
    config.dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    config.save_pretrained(out / "llm")
    tok.save_pretrained(out / "llm")

    perception, cfg = model.stage.perception, OmegaConf.to_container(model.cfg.perception, resolve=True)
    sections = {s: {"_target_": f"{_CLASSES[s][0].__module__}.{_CLASSES[s][0].__name__}", **cfg[s]}
                for s in ("preprocessor", "encoder")}
    state = {k: v.detach().cpu() for k, v in perception.state_dict().items()
             if k.startswith(("preprocessor.", "encoder."))}
    _write_nemo(out / "perception" / "encoder.nemo", {"sample_rate": cfg["preprocessor"].get("sample_rate", 16000),
                                                      **sections}, state)
    adapter = {k: v.detach().cpu().contiguous() for k, v in perception.adapter.state_dict().items()}
    save_file(adapter, out / "perception" / "adapter.safetensors")
    for key in ("init_from_nemo", "encoder_cache_dir"):
        cfg.pop(key, None)
    OmegaConf.save(OmegaConf.create(cfg), out / "perception" / "perception.yaml")

    il = model.interleave_cfg
    (out / "README.md").write_text(README.format(
        name=model.cfg.get("name") or "model", arch=config.architectures[0], stack=cfg["adapter"].get("stack", 1),
        hidden=model.llm_cfg.hidden_size, hop_ms=model.frame_spec.hop_seconds * 1000, audio=AUDIO_TOKEN,
        markers=f"between `{il.speech_start}` and `{il.speech_end}` " if il.markers else ""))
    return out


def _write_nemo(path: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    """A .nemo as NeMo's default connector writes one: ``model_config.yaml`` and ``model_weights.ckpt``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    members = {"model_config.yaml": OmegaConf.to_yaml(OmegaConf.create(config)).encode(),
               "model_weights.ckpt": buf.getvalue()}
    with tarfile.open(path, "w:") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
