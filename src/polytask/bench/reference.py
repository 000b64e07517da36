"""The external reference of `polytask bench quality`: one gradient-boosting model per task.

LightGBM (Ke et al., NeurIPS 2017) is what a practitioner would otherwise fit to a tabular task.
Each task gets its own model on the same features and rows as the neural cells (regression
targets standardised as the config standardises them, so the metrics come out in the target's
units through the same ``TaskMetrics``). Tuning: for each of a few leaf counts, trees are added
until the validation loss has not improved for 50 rounds; the leaf count with the best
validation loss is kept. The test metrics are those of that model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from polytask.core.errors import ConfigError

LEAVES = (31, 127)
INSTALL = "pip install 'polytask[bench]'"


def _lightgbm() -> Any:
    try:
        import lightgbm
    except ImportError:
        raise ConfigError(f"the gradient-boosting reference needs LightGBM: `{INSTALL}` (or `pip install lightgbm`)") from None
    return lightgbm


def gradient_boosting(loaded: Any, *, rounds: int = 1000, seed: int = 0, leaves: tuple[int, ...] = LEAVES
                      ) -> tuple[dict[str, dict[str, float]], int]:
    """Test metrics of one tuned LightGBM model per task, and the most trees any of them kept."""
    import torch

    from polytask.data.dataset import MultiOutputDataset
    from polytask.metrics.tracker import TaskMetrics

    lgb = _lightgbm()
    if not all(isinstance(getattr(loaded, s), MultiOutputDataset) for s in ("train", "val", "test")):
        raise ConfigError("the gradient-boosting reference needs one input table for all tasks (multi-output data)")
    x_train, x_val, x_test = (getattr(loaded, s).x.numpy() for s in ("train", "val", "test"))
    outputs: dict[str, torch.Tensor] = {}
    trees = 0
    for task in loaded.tasks:
        y_train, y_val = (getattr(loaded, s).targets[task.name].numpy() for s in ("train", "val"))
        params: dict[str, Any] = {"learning_rate": 0.1, "min_child_samples": 20, "subsample": 0.8, "subsample_freq": 1,
                                  "colsample_bytree": 0.8, "n_jobs": 1, "random_state": seed, "verbose": -1}
        if task.kind == "regression":
            params["objective"] = "regression"
        elif task.kind == "binary":
            params["objective"] = "binary"
        elif task.kind == "multiclass":
            params.update(objective="multiclass", num_class=task.num_classes)
        else:
            raise ConfigError(f"the gradient-boosting reference has no model for {task.kind} task '{task.name}'")
        best: tuple[float, Any] | None = None
        for count in leaves:
            model = lgb.train({**params, "num_leaves": count}, lgb.Dataset(x_train, y_train), num_boost_round=rounds,
                              valid_sets=[lgb.Dataset(x_val, y_val)],
                              callbacks=[lgb.early_stopping(50, verbose=False)])
            score = next(iter(model.best_score["valid_0"].values()))
            if best is None or score < best[0]:
                best = (score, model)
        assert best is not None
        model = best[1]
        trees = max(trees, model.best_iteration)
        raw = np.asarray(model.predict(x_test, num_iteration=model.best_iteration, raw_score=True), dtype=np.float32)
        # raw scores are the model's outputs before the link: logits for binary and multiclass,
        # values for regression, which is what TaskMetrics expects from a network's head
        outputs[task.name] = torch.from_numpy(raw)
    tracker = TaskMetrics(loaded.tasks)
    tracker.update(outputs, loaded.test.targets, loaded.test.masks)
    computed = tracker.compute()
    return {t.name: {k: v for k, v in computed[t.name].items() if k != "loss"} for t in loaded.tasks}, trees
