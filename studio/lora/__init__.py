"""All LoRA code of the studio: the planner (plan.py), save and load of PEFT-format adapters (io.py), the LoRA layers
shared by training and serving (layers.py: SlotLinear, ExpertSlots' serving slot buffers, the per-forward LoraBatch
and the expert LoRA product), the trainable expert LoRA (experts.py: ExpertAdapter, PEFT's fused expert layout) and
the serving slots' loader (slots.py: LoraSlots writes saved adapters into slots). Import the submodules; this
package imports nothing."""
