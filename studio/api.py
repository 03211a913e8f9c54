"""The Python API's own pieces: `finetune`, `plan`, training events and a notebook loss curve.

Reached through `import studio` (`studio.finetune(...)`, `studio.plan(...)`); the rest of the surface re-exports
the engine, registry, datasets and eval classes as they are. The CLI builds its config with the same function.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from studio.errors import StudioError
from studio.finetune import build_config, plan_and_estimate
from studio.train import TrainConfig, TrainResult, run_training

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
# the CLI's short flags, so `studio.finetune(lr=...)` points at the option's real name
_CLI_ALIASES = {"lr": "learning_rate", "steps": "max_steps", "rank": "r", "config": "recipe"}


# --------------------------------------------------------------------------- training events


@dataclass(frozen=True)
class TrainEvent:
    """One event of a training run, as `finetune(on_event=...)` delivers it.

    kind, in the order they come: "eval" at step 0 (the held-out loss before training), "begin" (max_steps
    known), "step" (a logged training step: loss, learning rate, tokens/s, ETA), "eval" (held-out loss, every
    eval_steps and at the end), "summary" (the trainer's closing averages) and "end" (the run's metrics, after
    the adapter is saved and registered). `data` holds every logged value,
    e.g. aux_loss / lm_loss for architectures with a router auxiliary loss.
    """

    kind: str
    step: int = 0
    max_steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    time: float = 0.0
    data: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_log(cls, raw: dict) -> TrainEvent:
        """An event from one line of the trainer's `training_log.jsonl` (what the trainer's callback emits)."""
        if raw.get("event") == "train_begin":
            kind = "begin"
        elif "eval_loss" in raw:
            kind = "eval"
        elif "loss" in raw:
            kind = "step"
        else:
            kind = "summary"
        return cls(kind=kind, step=int(raw.get("step") or 0), max_steps=raw.get("max_steps"),
                   loss=raw.get("loss"), eval_loss=raw.get("eval_loss"), learning_rate=raw.get("learning_rate"),
                   tokens_per_s=raw.get("tokens_per_s"), eta_s=raw.get("eta_s"), time=raw.get("time", time.time()),
                   data=dict(raw))


class LossCurve:
    """Collects training events and draws the loss curve: pass it as `studio.finetune(on_event=LossCurve())`.

    In a Jupyter kernel (or with live=True) the plot is drawn under the cell when training starts and redrawn
    as steps and evaluations arrive; elsewhere it only records. Display the object (or call `figure()`) for
    the final plot. `steps`/`losses` are the logged training losses, `eval_steps`/`eval_losses` the held-out ones.
    """

    def __init__(self, live: bool | None = None, min_interval_s: float = 0.5):
        self.live = _in_notebook() if live is None else live
        self.min_interval_s = min_interval_s
        self.events: list[TrainEvent] = []
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.eval_steps: list[int] = []
        self.eval_losses: list[float] = []
        self.tokens_per_s: float | None = None
        self._handle = None
        self._drawn_at = 0.0

    def __call__(self, event: TrainEvent) -> None:
        """Record one event (and redraw the live plot when something new is plotted)."""
        self.events.append(event)
        if event.kind == "step" and event.loss is not None:
            self.steps.append(event.step)
            self.losses.append(float(event.loss))
            if event.tokens_per_s is not None:
                self.tokens_per_s = float(event.tokens_per_s)
        elif event.kind == "eval" and event.eval_loss is not None:
            self.eval_steps.append(event.step)
            self.eval_losses.append(float(event.eval_loss))
        elif event.kind != "end":
            return
        if self.live:
            self._redraw(force=event.kind != "step")

    def figure(self):
        """The loss curve as a matplotlib Figure (no pyplot state: safe in threads and headless)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.0, 3.4), dpi=100)
        ax = fig.add_subplot()
        if self.steps:
            ax.plot(self.steps, self.losses, marker=".", label="training loss")
        if self.eval_steps:
            ax.plot(self.eval_steps, self.eval_losses, marker="o", linestyle="--", label="held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        title = "training"
        if self.tokens_per_s:
            title += f" ({self.tokens_per_s:,.0f} tokens/s)"
        ax.set_title(title)
        if self.steps or self.eval_steps:
            ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig

    def png(self) -> bytes:
        """The loss curve as PNG bytes."""
        import io

        buf = io.BytesIO()
        self.figure().savefig(buf, format="png")
        return buf.getvalue()

    def _repr_png_(self) -> bytes:
        return self.png()

    def _redraw(self, force: bool) -> None:
        now = time.time()
        if not force and now - self._drawn_at < self.min_interval_s:
            return
        self._drawn_at = now
        from IPython.display import Image, display

        image = Image(data=self.png(), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (where display() draws under the cell), not in a terminal IPython."""
    import sys

    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


# --------------------------------------------------------------------------- options


def _type_name(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return " | ".join(getattr(a, "__name__", str(a)) for a in args) + (
        " | None" if type(None) in typing.get_args(hint) else "")


def _check_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """Names and types of keyword options, checked before anything loads; returns them with paths as str."""
    out = {}
    for name, value in options.items():
        if name not in _FIELDS:
            hint = _CLI_ALIASES.get(name) or next(iter(difflib.get_close_matches(name, _FIELDS, 1)), None)
            raise StudioError(f"{where}: unknown option {name!r}" + (f" (did you mean {hint}?)" if hint else "")
                              + f"; see help(studio.{where}) for the options")
        hint = _HINTS[name]
        allowed = typing.get_args(hint) or (hint,)
        if value is None and type(None) in allowed:
            out[name] = None
            continue
        if isinstance(value, os.PathLike) and str in allowed:
            value = os.fspath(value)
        ok = any(_is_instance(value, t) for t in allowed if t is not type(None))
        if not ok:
            raise StudioError(f"{where}: option {name}={value!r} must be {_type_name(hint)}, "
                              f"got {type(value).__name__}")
        out[name] = float(value) if float in allowed and not isinstance(value, float) else value
    return out


def _is_instance(value, t) -> bool:
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, t)


def _config(recipe, options: dict[str, Any], where: str) -> TrainConfig:
    options = _check_options(options, where)
    if recipe is not None and not isinstance(recipe, (str, os.PathLike)):
        raise StudioError(f"{where}: recipe must be a path to a YAML recipe, got {type(recipe).__name__}")
    return build_config(os.fspath(recipe) if recipe is not None else None, options)


def _options_doc() -> str:
    lines = []
    for name, f in _FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else None
        lines.append(f"    {name} ({_type_name(_HINTS[name])}, default {default!r}; CLI --{name.replace('_', '-')}):"
                     f"\n        {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _signature(leading: list[inspect.Parameter], trailing: list[inspect.Parameter], returns) -> inspect.Signature:
    """leading params + every TrainConfig field as a keyword with its default and type + trailing params."""
    fields = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=_HINTS[n])
              for n, f in _FIELDS.items()]
    return inspect.Signature(leading + fields + trailing, return_annotation=returns)


# --------------------------------------------------------------------------- finetune


def finetune(recipe: str | os.PathLike | None = None, *, on_event: Callable[[TrainEvent], None] | None = None,
             verbose: bool = True, **options: Any) -> TrainResult:
    """Train a LoRA adapter on a (quantized) MoE base: `studio finetune` as a function.

    recipe: a YAML recipe (e.g. "recipes/tiny-moe-law.yaml"); keyword options override its values, and options
        given neither way take the defaults below.
    on_event: called with a TrainEvent at the start, at every logged step (loss, learning rate, tokens/s, ETA),
        at every held-out evaluation (step 0: before training) and at the end; `studio.LossCurve()` draws them.
    verbose: print the memory report, the LoRA plan and the held-out losses (a progress bar is shown either way).

    Returns a TrainResult: run_dir, adapter_dir (PEFT files + studio_adapter.json), metrics (eval_loss_before,
    eval_loss, eval_perplexity, train_loss, steps, ...), registry_ref ("law@v3" when registered), cancelled, and
    the trained model. A bad option raises StudioError before anything is loaded.

    Options (as `studio finetune --help`):
{options}
    """
    cfg = _config(recipe, options, "finetune")
    relay = None
    if on_event is not None:
        def relay(raw: dict) -> None:
            on_event(TrainEvent.from_log(raw))
    result = run_training(cfg, log=print if verbose else _quiet, on_event=relay)
    if on_event is not None:
        m = result.metrics
        on_event(TrainEvent(kind="end", step=int(m.get("steps", 0)), max_steps=cfg.max_steps if cfg.max_steps > 0
                            else None, loss=m.get("final_train_loss"), eval_loss=m.get("eval_loss"),
                            time=time.time(), data=dict(m, registry_ref=result.registry_ref,
                                                        cancelled=result.cancelled)))
    return result


def _quiet(*args, **kwargs) -> None:
    return None


# --------------------------------------------------------------------------- plan


@dataclass
class TrainingPlan:
    """What a training run would adapt and how much memory it would take, from the base's config alone.

    `lora` is the LoRA plan (groups of targeted modules, trainable parameters); `estimates` are the training
    memory estimates for the chosen quantization, then QLoRA 4-bit and 16-bit LoRA for comparison. `str(plan)`
    is what `studio finetune --dry-run` prints; in a notebook it renders as Markdown.
    """

    config: TrainConfig
    lora: Any  # studio.moe.plan.LoraPlan
    estimates: list = field(default_factory=list)  # [studio.models.memory.MemoryEstimate]
    device_memory: int | None = None

    @property
    def trainable_params(self) -> int:
        """LoRA parameters the run would train."""
        return self.lora.trainable_params

    @property
    def memory_bytes(self) -> int:
        """Estimated peak training memory of the chosen setup, in bytes."""
        return self.estimates[0].total_bytes

    @property
    def fits(self) -> bool:
        """Whether the chosen setup is estimated to fit the device memory (given, or detected)."""
        return self.estimates[0].fits(self.device_memory)

    def table(self) -> str:
        """The memory comparison table: component rows for each setup, totals and the fit verdicts."""
        from studio.models.memory import format_comparison

        return format_comparison(self.estimates)

    def to_dict(self) -> dict:
        """JSON-ready: the config, the plan and every estimate."""
        return {"config": dataclasses.asdict(self.config), "plan": self.lora.to_dict(),
                "estimates": [e.to_dict() for e in self.estimates], "fits": self.fits}

    def __str__(self) -> str:
        return f"{self.lora.format()}\n\n{self.table()}"

    def to_markdown(self) -> str:
        """The plan and the table as Markdown (fixed-width blocks, so the columns line up)."""
        verdict = "fits" if self.fits else "is estimated NOT to fit"
        return (f"**{self.config.base}**, quant={self.config.quant}: {self.trainable_params:,} trainable LoRA "
                f"parameters; the chosen setup {verdict}.\n\n```\n{self.lora.format()}\n```\n\n"
                f"```\n{self.table()}\n```\n")

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


def plan(recipe: str | os.PathLike | None = None, *, device_memory: str | int | None = None, num_devices: int = 1,
         **options: Any) -> TrainingPlan:
    """The LoRA plan and training-memory estimate of a run, without loading weights: `studio finetune --dry-run`.

    Takes the same recipe and options as `studio.finetune` (base, quant, targets, r, seq_len, batch_size,
    grad_checkpointing, ... matter here). device_memory: the budget to check against, e.g. "80GiB" (default:
    this machine's accelerator or RAM). num_devices: estimate per device of that many under FSDP2 (`--num-devices`).
    Works offline for the embedded bases and the recipe bases, whose configs
    ship with the studio.

    Options (as `studio finetune --help`):
{options}
    """
    cfg = _config(recipe, options, "plan")
    from studio.models.memory import parse_bytes

    budget = parse_bytes(device_memory) if device_memory is not None else None
    lora, estimates = plan_and_estimate(cfg, device_memory, num_devices)
    return TrainingPlan(config=cfg, lora=lora, estimates=list(estimates), device_memory=budget)


for _fn, _lead, _trail, _ret in (
    (finetune,
     [inspect.Parameter("recipe", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                        annotation=str | os.PathLike | None)],
     [inspect.Parameter("on_event", inspect.Parameter.KEYWORD_ONLY, default=None,
                        annotation=Callable[[TrainEvent], None] | None),
      inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=bool)],
     TrainResult),
    (plan,
     [inspect.Parameter("recipe", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                        annotation=str | os.PathLike | None)],
     [inspect.Parameter("device_memory", inspect.Parameter.KEYWORD_ONLY, default=None,
                        annotation=str | int | None),
      inspect.Parameter("num_devices", inspect.Parameter.KEYWORD_ONLY, default=1, annotation=int)],
     TrainingPlan),
):
    # help() and notebooks' completion show every option with its default, not just **options
    _fn.__signature__ = _signature(_lead, _trail, _ret)
    _fn.__doc__ = _fn.__doc__.replace("{options}", _options_doc())
del _fn, _lead, _trail, _ret
