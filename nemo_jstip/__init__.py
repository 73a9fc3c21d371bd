"""nemo_jstip: joint speech-text interleaved pretraining (JSTIP) for speech-LLMs, as a NeMo plugin."""

__version__ = "0.1.0"
