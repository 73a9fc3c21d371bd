"""Offline checks of the Dockerfile (there is no Docker engine here; `make docker-check` resolves its pip step)."""
import re
from pathlib import Path

DOCKERFILE = (Path(__file__).parents[1] / "Dockerfile").read_text()
RUN = [" ".join(m.split()) for m in re.findall(r"^RUN (.*?)(?<!\\)$", DOCKERFILE, flags=re.M | re.S)]


def test_builds_from_an_ngc_image():
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE, flags=re.M)
    assert base.startswith("nvcr.io/nvidia/") and re.search(r"^FROM \$\{BASE_IMAGE\}", DOCKERFILE, flags=re.M)


def test_image_packages_are_frozen_before_any_install():
    freeze = next(i for i, r in enumerate(RUN) if "image-constraints.txt" in r and "pip list" in r)
    for name in ("torch", "transformer", "apex", "megatron"):
        assert name in RUN[freeze], name
    installs = [i for i, r in enumerate(RUN) if "pip install" in r]
    assert installs and all(i > freeze and "-c /opt/image-constraints.txt" in RUN[i] for i in installs)
    assert not any(re.search(r"pip install[^&]*\bapex\b", r) for r in RUN), "never PyPI's unrelated apex"


def test_ends_with_an_import_check():
    last = RUN[-1]
    for module in ("transformer_engine", "megatron.core", "nemo.collections.asr", "lhotse", "nemo_jstip"):
        assert module in last, module
