"""Multi-process training glue: FSDP2 under `accelerate launch` (GPUs, or CPU processes over gloo), and what the
trainer reports about sharding.

`accelerate launch --config_file recipes/accelerate/fsdp2.yaml -m studio.finetune ...` sets ACCELERATE_USE_FSDP and
the FSDP_* variables; accelerate then shards the model with FSDP2's `fully_shard`, one unit per decoder layer. The
studio's quantized expert store is made of frozen parameters (studio.moe.experts, STORAGE_NOTE), so each rank holds
1/N of every layer's experts outside that layer's forward and backward.
"""

from __future__ import annotations

import os

import torch

from studio.errors import ModelError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config (or --use_fsdp) exports this for every process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp(trainer) -> None:
    """Called right after the trainer made its Accelerator: turn on FSDP where accelerate would not, and keep
    FSDP2's parameter dtype unset.

    - accelerate 1.15 upgrades a launch to FSDP only on accelerators (CUDA, XPU, ...): CPU processes (gloo) get
      plain DDP even with an FSDP config, silently replicating the whole model. torch's fully_shard itself runs on
      CPU over gloo (all-gather and reduce-scatter), so the studio switches the state to FSDP there.
    - With mixed precision, accelerate asks FSDP2 to all-gather every floating parameter in bf16: that would
      round the experts' frozen 4-bit statistics (absmax) and the fp32 LoRA masters on every gather. The studio
      already stores the frozen base in its compute dtype (bf16 on GPUs that support it), and the trainer's
      autocast computes in bf16, so FSDP2 gathers parameters as stored.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if fsdp_requested() and state.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch exported
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        trainer.is_fsdp_enabled = True
    plugin = getattr(state, "fsdp_plugin", None)
    if plugin is None:
        return
    if plugin.fsdp_version != 2:
        raise ModelError("the studio trains with FSDP2 only (FSDP1 cannot shard the quantized expert store next to "
                         "trainable LoRA factors): set fsdp_version: 2 in the accelerate config, as "
                         "recipes/accelerate/fsdp2.yaml does")
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin.mixed_precision_policy = MixedPrecisionPolicy()


def check_fsdp_quant(quant: str) -> None:
    """bitsandbytes' 8-bit Linear keeps its scales on the parameter object, which FSDP2's DTensor conversion drops."""
    if fsdp_requested() and world_size() > 1 and quant == "8bit":
        raise ModelError("--quant 8bit cannot be trained under FSDP2 (bitsandbytes' Int8Params lose their scales "
                         "when sharded); use --quant 4bit (QLoRA) or --quant none")


def expert_storage(model: torch.nn.Module) -> dict:
    """Bytes of the routed experts' stored weights: their full size and what each rank holds right now (outside a
    forward: under FSDP2 the shards). Every rank must call it in a distributed run (an all_gather_object)."""
    from studio.moe.experts import StudioExperts

    modules = [m for m in model.modules() if isinstance(m, StudioExperts)]
    total = sum(m.storage_bytes() for m in modules)
    resident = sum(m.storage_bytes(resident=True) for m in modules)
    per_rank = [resident]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        per_rank = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(per_rank, resident)
    return {"total_bytes": total, "resident_bytes_per_rank": per_rank}


def format_expert_storage(info: dict) -> str:
    total = info["total_bytes"]
    parts = ", ".join(f"rank {i}: {b:,} ({b / total:.1%})" for i, b in enumerate(info["resident_bytes_per_rank"]))
    return f"routed experts' stored weights: {total:,} bytes in all; held per rank outside a forward: {parts}"
