"""All LoRA code of the studio: the planner (plan.py), save and load of PEFT-format adapters (io.py), and the LoRA
layers shared by training and serving (slots.py: SlotLinear and ExpertSlots with serving slot buffers and one
LoraBatch per forward, or one trainable slot per named adapter; experts.py: ExpertSlots' trainable one-slot form).
Import the submodules; this package imports nothing."""
