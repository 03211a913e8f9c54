"""MoE architecture knowledge: target discovery, expert quantization, expert LoRA, routing statistics."""
