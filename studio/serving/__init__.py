"""The serving engine's parts beside its scheduler (studio/engine.py): requests, adapter residency in LoRA slots,
sampling and incremental detokenization. One module per job; each says in its first lines what it owns."""
