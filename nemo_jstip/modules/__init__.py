"""Model building blocks: speech perception (``perception``), the Megatron decoder LLM (``llm``), HF weight import (``hf_import``)."""
