"""All LoRA code of the studio: the planner (plan.py), save and load of PEFT-format adapters and the trainable layers
(io.py: PEFT's linears, studio.moe.experts' ExpertLora on the quantized fused experts), and the serving slots
(slots.py: slot buffers per layer, one LoraBatch per forward). Import the submodules; this package imports nothing."""
