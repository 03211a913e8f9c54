"""The trainer: LoRA on a (quantized) MoE base with TRL's SFTTrainer (accelerate underneath).

`run_training(TrainConfig(...))` is what `python -m studio.finetune` and the UI's worker call.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from studio.data.chat import encode_chat
from studio.errors import DatasetError, ModelError
from studio.moe.plan import LoraSettings


@dataclass
class TrainConfig:
    """Every training option, one per `studio finetune` flag (field help texts are the flags' help)."""

    # what
    base: str = field(default="tiny-moe", metadata={"help": "embedded name | local dir | hub id"})
    dataset: str = field(default="law", metadata={"help": "dataset registry ref (law, law@v2) or a file path"})
    domain: str | None = field(default=None, metadata={"help": "registry domain (default: the dataset name)"})
    # quantization
    quant: str = field(default="4bit", metadata={"help": "none | 8bit | 4bit (experts included)"})
    quant_type: str = field(default="nf4", metadata={"help": "nf4 | fp4"})
    double_quant: bool = field(default=False, metadata={"help": "quantize the 4-bit statistics too"})
    compute_dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})
    # LoRA
    targets: str = field(default="attention,experts", metadata={"help": "preset or names, comma separated"})
    r: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha/sqrt(r)"})
    train_router: bool = field(default=False, metadata={"help": "also train the router (frozen by default)"})
    expert_selection: str = field(default="all", metadata={
        "help": "routed experts that get LoRA, per MoE layer, from a routing profile of the training split: all | "
                "token:P (ESFT-Token: smallest set reaching token share P) | gate:P (ESFT-Gate: the same over mean "
                "gate score) | top:K (K most-routed) | random:<spec> (random, as many as <spec>)"})
    expert_profile_examples: int = field(default=0, metadata={
        "help": "training rows routed to build the expert profile (0: all; cached by base + dataset)"})
    # optimisation
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    epochs: float = field(default=1.0, metadata={"help": "epochs (ignored when max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "per-device batch size"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    seq_len: int = field(default=512, metadata={"help": "max tokens per example (or per pack)"})
    packing: bool = field(default=False, metadata={"help": "pack examples into full sequences"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "linear warmup share"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    router_aux_coef: float | None = field(default=None, metadata={"help": "router aux loss coefficient "
                                                                          "(default: the architecture's)"})
    # bookkeeping
    eval_steps: int = field(default=50, metadata={"help": "held-out eval every N steps (0: only at the end)"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N steps"})
    logging_steps: int = field(default=5, metadata={"help": "log every N steps"})
    output: str | None = field(default=None, metadata={"help": "run directory (default runs/<domain>-<time>)"})
    resume: str | None = field(default=None, metadata={"help": "checkpoint dir, or 'latest' in --output"})
    seed: int = field(default=42, metadata={"help": "seed for init, data order and dropout"})
    register: bool = field(default=True, metadata={"help": "register the adapter in the adapter registry"})
    cancel_file: str | None = field(default=None, metadata={"help": "training stops cleanly when this file appears"})
    device: str | None = field(default=None, metadata={"help": "cuda | cpu (default: cuda if available)"})
    experts_impl: str = field(default="grouped", metadata={
        "help": "routed experts forward: grouped (sorted once per layer, batched dequantization and matmuls) | "
                "eager (the per-expert reference loop)"})

    def lora_settings(self) -> LoraSettings:
        """The LoRA hyperparameters, validated (raises PlanError naming a bad r, alpha or dropout)."""
        return LoraSettings(r=self.r, alpha=self.alpha, dropout=self.dropout, use_rslora=self.use_rslora,
                            train_router=self.train_router)


@dataclass
class TrainResult:
    """What a training run produced: run_dir, adapter_dir (PEFT files + studio_adapter.json), metrics,
    registry_ref (when registered), cancelled, and the trained model (in-process callers only)."""

    run_dir: str
    adapter_dir: str
    metrics: dict
    registry_ref: str | None = None
    cancelled: bool = False
    model: object = field(default=None, repr=False)  # the trained model, for in-process callers


def _build_trainer_class():
    """SFTTrainer whose checkpoints hold only the adapter (PEFT format), not the whole quantized model."""
    from trl import SFTTrainer

    class StudioSFTTrainer(SFTTrainer):
        studio_plan = None
        studio_base_id = None

        def create_accelerator_and_postprocess(self):
            from studio.distributed import enable_fsdp

            super().create_accelerator_and_postprocess()
            enable_fsdp(self)  # FSDP2 on CPU processes too, parameters gathered as stored (see there)

        def save_model(self, output_dir=None, _internal_call=False):
            # every rank: under FSDP2 the adapter's shards are gathered (a collective), then rank 0 writes
            self._save(output_dir)

        def _save(self, output_dir=None, state_dict=None):
            from studio.adapters import adapter_state, save_adapter

            state = adapter_state(self.model, self.studio_plan, "default")
            if not self.args.should_save:
                return
            output_dir = output_dir or self.args.output_dir
            save_adapter(self.model, self.studio_plan, output_dir, "default", base_id=self.studio_base_id,
                         metadata={"checkpoint": True}, into_existing=True, state=state)

        def _save_optimizer_and_scheduler(self, output_dir):
            if not self.is_fsdp_enabled:
                return super()._save_optimizer_and_scheduler(output_dir)
            # Under FSDP, transformers would also write the whole sharded model (the quantized base included); the
            # checkpoint's model state is the adapter (_save). The optimizer's shards go through accelerate (one
            # torch.distributed.checkpoint folder, which transformers' resume path reads back).
            from accelerate.utils import save_fsdp_optimizer

            save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                                output_dir)
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            from safetensors.torch import load_file

            from studio.adapters import adapter_parameters, copy_adapter_weights, router_parameters

            weights = load_file(os.path.join(resume_from_checkpoint, "adapter_model.safetensors"))
            live = adapter_parameters(model or self.model, "default")
            live.update(router_parameters(model or self.model, self.studio_plan))
            check_resumable(resume_from_checkpoint, self.studio_plan, set(weights), set(live))
            # PEFT layout on disk; expert-selective factors are compacted to their slots; under FSDP2 each rank
            # keeps its shard
            copy_adapter_weights(model or self.model, "default", live, weights, resume_from_checkpoint)

    return StudioSFTTrainer


def check_resumable(checkpoint: str, plan, saved: set[str], live: set[str]) -> None:
    """A checkpoint resumes only under the LoRA plan that wrote it: the same r, alpha, rslora and router setting
    (recorded in its studio_adapter.json, when it has one) and the same adapter tensors, none missing and none
    left over. Otherwise a ModelError names the difference and the fix (a left-over tensor would otherwise surface
    as torch's "parameter group that doesn't match the size" from the optimizer, a different rank as a shape
    error blaming the base)."""
    from studio.lora.io import read_adapter_metadata

    recorded = read_adapter_metadata(checkpoint).get("plan") or {}
    was, now = recorded.get("settings") or {}, asdict(plan.settings)

    def flag(key, value):
        if isinstance(value, bool):
            return f"--{'' if value else 'no-'}{key.replace('_', '-')}"
        return f"--{key} {value:g}" if isinstance(value, float) else f"--{key} {value}"

    differ = [k for k in ("r", "alpha", "use_rslora", "train_router") if k in was and was[k] != now[k]]
    if differ:
        raise ModelError(f"checkpoint {checkpoint} was trained with {', '.join(f'{k}={was[k]}' for k in differ)}; "
                         f"this run has {', '.join(f'{k}={now[k]}' for k in differ)}. Resume with the checkpoint's "
                         f"settings ({' '.join(flag(k, was[k]) for k in differ)}) or start a new run without "
                         "--resume.")
    missing, unexpected = sorted(live - saved), sorted(saved - live)
    if missing or unexpected:
        what = "; ".join(part for part in (
            f"it lacks {len(missing)} adapter tensors this run trains (e.g. {missing[0]})" if missing else "",
            f"it holds {len(unexpected)} tensors this run does not train (e.g. {unexpected[0]})" if unexpected else "")
            if part)
        selection = (recorded.get("expert_selection") or {}).get("spec")
        trained = (f" (it was trained with targets={','.join(recorded['targets'])}"
                   f"{', expert selection ' + selection if selection else ''})" if recorded.get("targets") else "")
        raise ModelError(f"checkpoint {checkpoint} was made with another LoRA plan{trained}: {what}. Resume with the "
                         "--targets, --expert-selection and --train-router it was trained with, or start a new run "
                         "without --resume.")


class _Cancel:
    """Ctrl-C or a cancel file ask the trainer to stop after the current step and save a checkpoint."""

    def __init__(self, cancel_file: str | None):
        self.cancel_file = cancel_file
        self.requested = False
        self._previous = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame):
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print("\ncancel requested: finishing this step and saving a checkpoint (Ctrl-C again to abort)",
              flush=True)

    def check(self) -> bool:
        if not self.requested and self.cancel_file and os.path.exists(self.cancel_file):
            self.requested = True
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _any_rank(flag: bool) -> bool:
    """`flag` of any rank, on every rank: each process checks the cancel file (or got Ctrl-C) on its own, and all
    must stop after the same step and save the same checkpoint (under FSDP saving is a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend()) else "cpu"
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _callbacks(cancel: _Cancel, log_path: Path, aux_coef: float, on_event):
    from transformers import TrainerCallback

    class StudioCallback(TrainerCallback):
        """Cancel checks, a JSONL event log (the UI plots it) and LM loss logged apart from the aux loss."""

        def __init__(self):
            self.t0 = time.time()
            # tokens/s counts only time inside training steps: held-out evals (the one before training, the periodic
            # ones), checkpoint saves and logging happen between steps and are not training throughput.
            self.step_time = 0.0
            self.step_started: float | None = None
            self.last = (0.0, 0)

        def _emit(self, event: dict):
            if not is_main_process():  # one event log per run, written by the main process
                return
            with open(log_path, "a") as f:
                f.write(json.dumps(event) + "\n")
            if on_event:
                on_event(event)

        def on_train_begin(self, args, state, control, **kw):
            self._emit({"event": "train_begin", "max_steps": state.max_steps, "time": time.time()})

        def on_step_begin(self, args, state, control, **kw):
            self.step_started = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.step_started is not None:
                self.step_time += time.perf_counter() - self.step_started
                self.step_started = None
            if _any_rank(cancel.check()):
                control.should_training_stop = True
                control.should_save = True

        def on_log(self, args, state, control, logs=None, **kw):
            now = time.time()
            tokens = (logs or {}).get("num_tokens")
            if tokens is not None and self.step_time > self.last[0]:
                # written into the trainer's own dict, so the progress bar and log_history show the same figure
                logs["tokens_per_s"] = (tokens - self.last[1]) / (self.step_time - self.last[0])
                self.last = (self.step_time, tokens)
            logs = dict(logs or {})
            if "loss" in logs and "aux_loss" in logs:
                logs["lm_loss"] = logs["loss"] - aux_coef * logs["aux_loss"]
            elapsed = now - self.t0
            if state.global_step and state.max_steps:
                logs["eta_s"] = elapsed / state.global_step * (state.max_steps - state.global_step)
            self._emit({"event": "log", "step": state.global_step, "max_steps": state.max_steps,
                        "time": now, **logs})

    from transformers.trainer_callback import ProgressCallback

    class StudioProgress(ProgressCallback):
        """The step bar shows loss, eval loss and tokens/s in its postfix instead of printing log dicts."""

        def __init__(self):
            super().__init__()
            self.postfix: dict = {}

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or self.training_bar is None:
                return
            logs = logs or {}
            if "loss" in logs:
                self.postfix["loss"] = f"{logs['loss']:.4f}"
            if "eval_loss" in logs:
                self.postfix["eval"] = f"{logs['eval_loss']:.4f}"
            if "aux_loss" in logs:
                self.postfix["aux"] = f"{logs['aux_loss']:.3f}"
            if "tokens_per_s" in logs:  # set by StudioCallback, which runs first
                self.postfix["tok/s"] = f"{logs['tokens_per_s']:.0f}"
            self.training_bar.set_postfix(self.postfix, refresh=True)

    class PlainProgress(TrainerCallback):
        """Output to a file or a pipe (the web UI's worker log, CI): one plain line per logging step, because
        tqdm's redrawn bars become nested bars and `[A` escape codes there."""

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not state.max_steps:  # not the evaluation before training
                return
            logs = logs or {}
            keys = [("loss", "loss", ".4f"), ("eval_loss", "eval_loss", ".4f"), ("aux_loss", "aux", ".3f"),
                    ("learning_rate", "lr", ".2e")]
            parts = [f"{label} {logs[k]:{spec}}" for k, label, spec in keys if isinstance(logs.get(k), (int, float))]
            line = f"step {state.global_step}/{state.max_steps}  " + "  ".join(parts)
            if parts and line != getattr(self, "last", None):  # the final evaluation repeats the last step's
                print(line, flush=True)
                self.last = line

    return [StudioCallback(), StudioProgress() if _interactive() else PlainProgress()]


def _interactive() -> bool:
    """Progress bars only on a terminal (tqdm draws on stderr)."""
    return sys.stderr.isatty()


def _tokenized(rows, tokenizer) -> list[dict]:
    """Rows as input_ids + assistant_masks, encoded by the one chat encoder (control tokens typed inside a message
    are text, as at inference), so SFTTrainer trains on exactly what the engine would feed the model."""
    from studio.eval.heldout import training_chat_template

    template = training_chat_template(tokenizer)
    out = []
    for messages in rows:
        enc = encode_chat(tokenizer, messages, chat_template=template, assistant_mask=True)
        out.append({"input_ids": enc.input_ids, "assistant_masks": enc.assistant_masks})
    return out


def _filter_rows(rows, tokenizer, seq_len: int):
    """Drop examples whose prompt alone fills the sequence (no assistant token would be trained)."""
    kept, dropped = [], 0
    for messages in rows:
        last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt_ids = encode_chat(tokenizer, messages[:last_assistant], add_generation_prompt=True).input_ids
        if len(prompt_ids) < seq_len - 1:
            kept.append(messages)
        else:
            dropped += 1
    return kept, dropped


def _token_ids(encoded) -> list[int]:
    """apply_chat_template returns a BatchEncoding in transformers 5 and a plain list in 4."""
    return list(encoded["input_ids"]) if hasattr(encoded, "keys") else list(encoded)


def check_seq_len(tokenizer, seq_len: int) -> int:
    """The chat template's own overhead; a sequence length that cannot hold it plus one token is an error."""
    ids = _token_ids(tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=True))
    if seq_len <= len(ids):
        raise DatasetError(f"--seq-len {seq_len} is too short: the chat template alone takes {len(ids)} tokens for a "
                           f"one-word exchange. Use --seq-len {max(64, 4 * len(ids))} or more.")
    return len(ids)


def default_run_dir(domain: str) -> Path:
    return Path("runs") / f"{domain}-{time.strftime('%Y%m%d-%H%M%S')}"


def _latest_checkpoint(run_dir: Path) -> str | None:
    ckpts = sorted(run_dir.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(ckpts[-1]) if ckpts else None


def library_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def prepare(cfg: TrainConfig, log=print):
    """Load data and base, plan LoRA; everything before the first step. Returns a dict of pieces."""
    from studio.data import resolve_dataset
    from studio.models.loading import QuantSpec, format_memory, load_base
    from studio.moe.plan import build_plan

    dataset = resolve_dataset(cfg.dataset)
    domain = cfg.domain or dataset.name
    quant = QuantSpec(mode=cfg.quant, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                      compute_dtype=cfg.compute_dtype)
    settings = cfg.lora_settings()
    loaded = load_base(cfg.base, quant, device=cfg.device, experts_impl=cfg.experts_impl)
    log(f"base {cfg.base} ({loaded.arch.family}) loaded with quant={cfg.quant}; memory by component:")
    log(format_memory(loaded.memory))
    check_seq_len(loaded.tokenizer, cfg.seq_len)
    train_rows, dropped_train = _filter_rows(dataset.train_messages(), loaded.tokenizer, cfg.seq_len)
    eval_rows, dropped_eval = _filter_rows(dataset.eval_messages(), loaded.tokenizer, cfg.seq_len)
    if not train_rows:
        raise DatasetError(f"dataset {dataset.ref} is empty after filtering: all {dropped_train} training rows have "
                           f"prompts longer than --seq-len {cfg.seq_len}. Raise --seq-len or shorten the prompts.")
    if dropped_train or dropped_eval:
        log(f"dropped {dropped_train} train / {dropped_eval} eval rows whose prompt exceeds --seq-len {cfg.seq_len}")
    from studio.models.memory import count_parameters

    # the base's unquantized count, the same definition as the dry run and the web UI (see trainable_line)
    selection = select_for_training(cfg, loaded, dataset, log)
    plan = build_plan(loaded.model, loaded.arch, loaded.components, cfg.targets, settings,
                      total_params=count_parameters(loaded.model.config).total,
                      expert_ids=selection["experts"] if selection else None,
                      expert_selection=selection["plan"] if selection else None)
    log(plan.format())
    return dict(dataset=dataset, domain=domain, loaded=loaded, plan=plan, train_rows=train_rows,
                eval_rows=eval_rows, dropped={"train": dropped_train, "eval": dropped_eval}, selection=selection)


def select_for_training(cfg: TrainConfig, loaded, dataset, log=print) -> dict | None:
    """`--expert-selection`: the routing profile of the training split (cached) and the experts chosen from it;
    None for `all`. Returns {"experts": {layer: ids}, "plan": what the plan records, "metadata": the
    studio_adapter.json record (spec, experts, profile summary, token shares and mean gates)}."""
    from studio.experts.profile import profile_experts
    from studio.experts.selection import parse_selection, select_experts

    sel = parse_selection(cfg.expert_selection)
    if sel.is_all:
        return None
    profile = profile_experts(cfg.base, dataset.ref, "train", seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                              max_examples=cfg.expert_profile_examples, loaded=loaded, log=log)
    experts = select_experts(profile, sel, seed=cfg.seed)
    num_experts = {p: profile.num_experts for p in profile.layers}
    plan = {"spec": sel.spec, "seed": cfg.seed, "num_experts": num_experts, "profile": profile.summary()}
    meta = dict(plan, experts=experts, token_share=profile.token_share(), mean_gate=profile.mean_gate(),
                layers=profile.layers)
    return {"experts": experts, "plan": plan, "metadata": meta}


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun / accelerate set RANK), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def _quiet(*args, **kwargs) -> None:
    return None


def run_training(cfg: TrainConfig, log=print, on_event=None) -> TrainResult:
    """Train as `cfg` says; under a distributed launch only the main process logs (every rank trains)."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig

    from studio.adapters import apply_plan, save_adapter

    if not is_main_process():
        log = _quiet
    if not _interactive():  # to a file or pipe: no redrawn bars (loading weights, tokenizing), PlainProgress lines
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    from studio.distributed import check_fsdp_quant

    check_fsdp_quant(cfg.quant)
    set_seed(cfg.seed)
    p = prepare(cfg, log)
    loaded, plan, dataset = p["loaded"], p["plan"], p["dataset"]
    model = loaded.model
    set_seed(cfg.seed)  # LoRA init does not depend on how much randomness loading consumed
    apply_plan(model, plan, "default", trainable=True)
    # The model carries trainable adapters; tell transformers so it accepts a quantized base for training.
    model._hf_peft_config_loaded = True
    run_dir = Path(cfg.output) if cfg.output else default_run_dir(p["domain"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():  # one writer per run directory
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log_path = run_dir / "training_log.jsonl"
    resume = cfg.resume
    if resume == "latest":
        resume = _latest_checkpoint(run_dir)
        if resume is None:
            raise ModelError(f"--resume latest: no checkpoint under {run_dir}/checkpoints")
    if resume and not Path(resume).is_dir():
        raise ModelError(f"--resume {resume}: no such checkpoint directory")
    device = next(model.parameters()).device
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported() and cfg.compute_dtype in ("auto", "bfloat16")
    aux_coef = cfg.router_aux_coef if cfg.router_aux_coef is not None else (
        getattr(model.config, "router_aux_loss_coef", 0.0) if loaded.arch.aux_loss else 0.0)
    args = SFTConfig(
        output_dir=str(run_dir / "checkpoints"), seed=cfg.seed, data_seed=cfg.seed,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, max_length=cfg.seq_len, packing=cfg.packing,
        # the rows come tokenized with their assistant masks (see _tokenized): TRL builds the labels from the masks.
        # transformers 5.23 renamed gradient_checkpointing* (the old names warn with a FutureWarning; TRL's
        # SFTConfig sets the old one by default, so the new ones must be given explicitly)
        assistant_only_loss=False, activation_checkpointing=cfg.grad_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}, bf16=use_bf16,
        use_cpu=device.type == "cpu", lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, logging_steps=cfg.logging_steps,
        eval_strategy="steps" if cfg.eval_steps > 0 else "no", eval_steps=cfg.eval_steps or None,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=3, report_to="none",
        router_aux_loss_coef=aux_coef, dataset_num_proc=None, remove_unused_columns=True,
        disable_tqdm=not _interactive(), ddp_find_unused_parameters=False,
    )
    trainer_cls = _build_trainer_class()
    train_ds = Dataset.from_list(_tokenized(p["train_rows"], loaded.tokenizer))
    eval_ds = Dataset.from_list(_tokenized(p["eval_rows"], loaded.tokenizer)) if p["eval_rows"] else None
    with _Cancel(cfg.cancel_file) as cancel:
        trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              processing_class=loaded.tokenizer,
                              callbacks=_callbacks(cancel, log_path, aux_coef, on_event))
        from transformers.trainer_callback import ProgressCallback

        from transformers.trainer_callback import PrinterCallback

        for cb in [c for c in trainer.callback_handler.callbacks if type(c) in (ProgressCallback, PrinterCallback)]:
            trainer.remove_callback(cb)  # replaced by StudioProgress (a terminal) or PlainProgress (a file or pipe)
        trainer.studio_plan, trainer.studio_base_id = plan, cfg.base
        metrics: dict = {}

        def evaluate_before():
            before = trainer.evaluate()
            metrics["eval_loss_before"] = _lm_loss(before, aux_coef, "eval_")
            log(f"held-out loss before training: {metrics['eval_loss_before']:.4f}")

        if eval_ds is not None and not resume:
            if trainer.is_fsdp_enabled:
                # accelerate shards a model under FSDP2 only together with its optimizer, which train() makes:
                # evaluate once it has, before the first step
                from transformers import TrainerCallback

                class EvaluateBefore(TrainerCallback):
                    def on_train_begin(self, args, state, control, **kw):
                        evaluate_before()

                trainer.add_callback(EvaluateBefore())
            else:
                evaluate_before()
        out = trainer.train(resume_from_checkpoint=resume)
        metrics["train_loss"] = out.training_loss
        metrics["steps"] = trainer.state.global_step
        cancelled = cancel.requested
    history = [h for h in trainer.state.log_history if "loss" in h]
    if history:
        metrics["final_train_loss"] = history[-1]["loss"]
    if eval_ds is not None:
        # The trainer already evaluates after its last step (step-based eval); run it again only when it did not
        # (a cancelled run, or eval_steps 0).
        ended = [h for h in trainer.state.log_history
                 if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        after = dict(ended[-1]) if ended else trainer.evaluate()
        metrics["eval_loss"] = _lm_loss(after, aux_coef, "eval_")
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
        if "eval_aux_loss" in after:
            metrics["eval_aux_loss"] = after["eval_aux_loss"]
        log(f"held-out loss after training:  {metrics['eval_loss']:.4f}")
    aux = [h["aux_loss"] for h in trainer.state.log_history if "aux_loss" in h]
    if aux:
        metrics["aux_loss"] = aux[-1]
    from studio.adapters import adapter_state
    from studio.distributed import expert_storage, format_expert_storage, world_size

    if world_size() > 1:  # every rank: an all_gather of the bytes each holds
        metrics["expert_storage"] = expert_storage(model)
        log(format_expert_storage(metrics["expert_storage"]))
    state = adapter_state(model, plan, "default")  # every rank: under FSDP2 the shards are gathered
    result = TrainResult(run_dir=str(run_dir), adapter_dir=str(run_dir / "adapter"), metrics=metrics,
                         cancelled=cancelled, model=model)
    if not trainer.args.should_save:  # only rank 0 writes the adapter, the log and the registry entry
        return result
    metadata = {
        "domain": p["domain"],
        "base": loaded.describe() | {"id": cfg.base},
        "quantization": asdict(loaded.quant),
        "memory": loaded.memory,
        "dataset": {"ref": dataset.ref, "name": dataset.name, "version": dataset.number, "hash": dataset.hash,
                    "dropped": p["dropped"]},
        "hyperparameters": asdict(cfg),
        "expert_selection": (p["selection"] or {}).get("metadata"),
        "metrics": metrics,
        "library_versions": library_versions(),
        "cancelled": cancelled,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_adapter(model, plan, result.adapter_dir, "default", base_id=cfg.base, metadata=metadata, state=state)
    if log_path.exists():
        import shutil

        shutil.copy(log_path, Path(result.adapter_dir) / "training_log.jsonl")
    if cfg.register and not cancelled:
        result.registry_ref = _register(result.adapter_dir, p["domain"], log)
    return result


def _lm_loss(metrics: dict, aux_coef: float, prefix: str) -> float:
    loss = metrics[f"{prefix}loss"]
    if f"{prefix}aux_loss" in metrics:
        loss -= aux_coef * metrics[f"{prefix}aux_loss"]
    return float(loss)


def _register(adapter_dir: str, domain: str, log) -> str | None:
    try:
        from studio.registry import AdapterRegistry
    except ImportError:
        log(f"adapter written to {adapter_dir} (the adapter registry is not available)")
        return None
    version = AdapterRegistry().register(adapter_dir, domain=domain)
    log(f"registered {version.ref} in the adapter registry")
    return version.ref
