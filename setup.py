"""nemo_jstip: JSTIP (joint speech-text interleaved pretraining) as a NeMo extension plugin."""
from setuptools import find_packages, setup

setup(
    name="nemo_jstip",
    version="0.1.0",
    description="Joint speech-text interleaved pretraining (JSTIP) for speech-LLMs on NeMo + Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["nemo_jstip", "nemo_jstip.*"]),
    package_data={"nemo_jstip.prep": ["wordlists/*.yaml", "wordlists/*.txt"]},
    python_requires=">=3.12",
    install_requires=[
        "nemo_toolkit[asr]>=3.0.0,<3.1",
        "megatron-core>=0.19,<0.21",  # the LLM is a GPTModel (docs/training.md, "GPTModel, not HybridModel")
        "lhotse>=1.33.0,<1.34",
        "hydra-core",  # versions as NeMo pins them
        "omegaconf",
        "num2words>=0.5.13",
        "pocketsphinx>=5.0.4,<5.1",  # forced alignment of unaligned corpora (prep/align.py); 5.0.4 has wheels
        "peft",  # NeMo's speechlm2 imports it; we use it for LoRA
        "matplotlib>=3.8",  # evaluation plots (nemo_jstip.plots); TensorBoard event reading comes with NeMo/Lightning
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6"],
        # GPU-only, shipped by NGC images; never PyPI's unrelated `apex`.
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["jstip-make-corpus=nemo_jstip.prep.corpus:main"]},
)
