"""All LoRA code of the studio: the planner (plan.py), save and load of PEFT-format adapters with PEFT's linear layers
(io.py), the trainable LoRA of the quantized fused experts (experts.py: ExpertLora), and the serving slots (slots.py:
slot buffers per layer, one LoraBatch per forward). Import the submodules; this package imports nothing."""
