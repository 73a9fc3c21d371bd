"""Model building blocks: speech perception (``perception``), the Megatron decoder LLM (``llm``), HF configs
and weights in both directions (``hf_import``), decoding (``generate``)."""
