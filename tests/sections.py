"""Tests build many small Trainers from a few flat settings; this groups them into sections."""

from __future__ import annotations

from typing import Any

_SECTIONS = {
    "loop": ("epochs", "batch_size", "steps_per_epoch", "loader_mode", "monitor", "patience", "checkpoint_every"),
    "optim": ("optimizer", "lr", "weight_decay", "momentum", "scheduler", "clip"),
    "run": ("device", "precision", "progress"),
}


def sectioned(**flat: Any) -> dict[str, Any]:
    """``epochs=2, lr=0.1, method="x", task_scheduler_params={...}`` → Trainer keyword arguments."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section = next((s for s, keys in _SECTIONS.items() if key in keys), None)
        if section is not None:
            out.setdefault(section, {})[key] = value
        elif key.endswith("_params"):
            continue
        else:
            out[key] = value
    for key in ("method", "sampler", "task_scheduler"):
        if f"{key}_params" in flat:
            out[key] = {"name": flat.get(key, "static" if key == "method" else None), **flat[f"{key}_params"]}
    return out


def interrupting(at: int) -> Any:
    """Equal weighting that raises KeyboardInterrupt at step ``at``, as a killed job would."""
    from polytask.methods.equal import Equal

    class Interrupt(Equal):
        def weights(self, step: Any) -> Any:
            if step.index == at:
                raise KeyboardInterrupt
            return super().weights(step)

    return Interrupt()
