"""A trained :class:`MultiTaskModel` to a file other programs read: ONNX, TorchScript, safetensors.

* ONNX (``torch.onnx.export`` with the ``torch.export``-based exporter, which needs
  ``onnxscript``): one input, one output per task named after the task, a free batch dimension.
* TorchScript (``torch.jit.trace``): a module whose ``forward(x)`` returns ``{task: output}``.
* safetensors: the model's state dict plus a JSON header (``metadata()["polytask"]``) naming the
  architecture and the tasks; :func:`load_weights` puts it back into a freshly built model.

Outputs are the model's own (``model(x)``): regression values (standardised when the task has a
``target_scaling``, recorded in the description), binary and multilabel logits, multiclass
logits, i.e. what :meth:`Task.predict` turns into values, probabilities and classes.
Every file carries the same description of the model (:func:`describe`), ONNX in its metadata
property ``polytask``, TorchScript in the extra file ``polytask.json``.

This module imports only ``core`` and ``models``; the optional packages are imported on use
(``pip install 'polytask[export]'``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError, PolytaskError, closest, require
from polytask.models.base import MultiTaskModel
from polytask.models.encoders import MLP, Tabular

Format = Literal["onnx", "torchscript", "safetensors"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript", "safetensors")
SUFFIXES: dict[str, str] = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript",
                            ".jit": "torchscript", ".safetensors": "safetensors"}
METADATA_KEY = "polytask"
TOLERANCE = 1e-4  # what the self-check of an exported file allows (float32 kernels differ slightly)


class ExportError(PolytaskError):
    """A model could not be written to (or read back from) an export format."""


# ------------------------------------------------------------------------------------ helpers
def resolve_format(path: str | Path, format: str | None) -> str:
    """``format`` checked, or the one the suffix of ``path`` names (``.onnx``, ``.pt``/``.ts``,
    ``.safetensors``); ONNX when neither says."""
    if format is None:
        return SUFFIXES.get(Path(path).suffix.lower(), "onnx")
    if format not in FORMATS:
        raise InvalidParameterError(f"export format must be one of {', '.join(FORMATS)}; found {format!r}."
                                    f"{closest(str(format), FORMATS)}")
    return format


def architecture_name(model: nn.Module) -> str:
    """The registry name of the model's architecture (its class name when unregistered)."""
    return getattr(type(model), "registry_name", type(model).__name__)


def output_names(model: MultiTaskModel, task: str | None = None) -> list[str]:
    """The tasks an export of ``model`` outputs, in order: all of them, or only ``task`` for a
    model with per-task input stems (the other heads would read that task's inputs)."""
    if task is not None and task not in model.task_names:
        raise InvalidParameterError(f"task '{task}' is not a task of this model.{closest(task, model.task_names)} "
                                    f"Tasks: {', '.join(model.task_names)}")
    stems = getattr(model, "stems", None)
    if isinstance(stems, nn.ModuleDict) and len(stems):
        if task is None:
            raise InvalidParameterError(f"this model has per-task inputs (stems for {', '.join(stems)}); expected "
                                        "task=NAME: each task's inputs are exported as a model of their own")
        return [task]
    return list(model.task_names)


def input_name(model: MultiTaskModel) -> str:
    """``input``, or ``inputs`` when a task is itself called ``input``."""
    return "inputs" if "input" in model.task_names else "input"


def example_input(model: MultiTaskModel, task: str | None = None, batch: int = 2) -> Tensor:
    """A batch of zeros shaped like the model's inputs, where the model tells its input width:
    a per-task stem, an MLP or a tabular encoder. Other encoders (CNN images, text tokens) do
    not fix their input's shape: pass ``example`` (a batch of real inputs) instead."""
    stems = getattr(model, "stems", None)
    if task is not None and isinstance(stems, nn.ModuleDict) and task in stems and isinstance(stems[task], nn.Linear):
        return torch.zeros(batch, stems[task].in_features)
    for module in model.modules():
        if isinstance(module, MLP):
            first = next(m for m in module.modules() if isinstance(m, nn.Linear))
            return torch.zeros(batch, first.in_features)
        if isinstance(module, Tabular):
            return torch.zeros(batch, module.n_numeric + len(module.cardinalities))
    encoders = sorted({type(m).__name__ for m in model.modules() if getattr(type(m), "registry_name", None)
                       and m is not model})
    raise InvalidParameterError(
        f"the input shape of this {architecture_name(model)} model (encoder {', '.join(encoders) or 'unknown'}) "
        "cannot be read from its layers; expected example=<a batch of inputs> (e.g. torch.zeros(2, 1, 28, 28) for "
        "28×28 grey images); its shape except the batch dimension is fixed in the exported file")


def describe(model: MultiTaskModel, example: Tensor | None, outputs: list[str], extra: Mapping[str, Any] | None = None
             ) -> dict[str, Any]:
    """The JSON description every exported file carries: architecture, tasks, outputs and (with
    ``example``) the input's name, shape (None: the free batch dimension) and dtype."""
    from polytask import __version__

    # target_scaling: a regression output o is in standardised units, the value is o·std + mean
    tasks = [{"name": t.name, "kind": t.kind, "num_classes": t.num_classes,
              "target": list(t.target) if isinstance(t.target, tuple) else t.target,
              "target_scaling": list(t.target_scaling) if t.target_scaling is not None else None}
             for t in (model.tasks[n] for n in model.task_names)]
    info: dict[str, Any] = {
        "format": "polytask", "polytask_version": __version__, "architecture": architecture_name(model),
        "tasks": tasks, "outputs": outputs,
    }
    if example is not None:
        info["input"] = {"name": input_name(model), "shape": [None, *example.shape[1:]],
                         "dtype": str(example.dtype).split(".")[-1]}
    info.update(extra or {})
    return info


class _Outputs(nn.Module):
    """``model(x, task=task)`` as a tuple (ONNX) or dict (TorchScript) of the exported tasks."""

    def __init__(self, model: MultiTaskModel, outputs: list[str], task: str | None, as_dict: bool) -> None:
        super().__init__()
        self.model, self.outputs, self.task, self.as_dict = model, outputs, task, as_dict

    def forward(self, x: Tensor) -> Any:
        out = self.model(x, tasks=self.outputs, task=self.task)
        return {t: out[t] for t in self.outputs} if self.as_dict else tuple(out[t] for t in self.outputs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings, exporter log lines (``torchvision is not installed``) or partial graphs that
    ``torch.export`` prints to stderr on failure (its error, which we re-raise, says why)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.fx", "torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check_input(example: Tensor) -> Tensor:
    if not isinstance(example, Tensor) or example.dim() < 1 or len(example) < 2:
        found = tuple(example.shape) if isinstance(example, Tensor) else type(example).__name__
        raise InvalidParameterError(f"`example` must be a tensor holding a batch of at least 2 inputs (a batch of 1 "
                                    f"would fix the batch dimension); found {found}")
    return example


def _probe(example: Tensor) -> Tensor:
    """A batch of another size than the example's (the batch dimension must have stayed free) and,
    for real-valued inputs, other values (a branch on the data must not have been baked in)."""
    probe = torch.cat([example, example[:1]])
    if probe.is_floating_point():
        noise = torch.randn(probe.shape, generator=torch.Generator().manual_seed(0))
        probe = probe + noise.to(probe.device, probe.dtype)
    return probe


def _reference(model: MultiTaskModel, x: Tensor, outputs: list[str], task: str | None) -> dict[str, Tensor]:
    with torch.no_grad():
        out = model(x, tasks=outputs, task=task)
    return {t: out[t].detach().cpu() for t in outputs}


def _compare(format: str, model: MultiTaskModel, got: Mapping[str, Any], want: Mapping[str, Tensor]) -> float:
    worst = 0.0
    for name, ref in want.items():
        value = torch.as_tensor(got[name])
        if value.shape != ref.shape:
            raise ExportError(f"the {format} export of architecture '{architecture_name(model)}' gives task '{name}' "
                              f"shape {tuple(value.shape)} for a batch of {len(ref)}; expected {tuple(ref.shape)} (the "
                              "batch dimension was fixed while tracing: a layer reads the batch size as a Python int)")
        worst = max(worst, float((value.float() - ref.float()).abs().max()) if ref.numel() else 0.0)
    if worst > TOLERANCE:
        raise ExportError(f"the {format} export of architecture '{architecture_name(model)}' differs from the PyTorch "
                          f"model by {worst:.3g} (more than {TOLERANCE:g}) on inputs of another batch size and other "
                          "values than the example's: the model reads the batch size as a Python int or branches on the "
                          "values of its inputs, which a trace records as constants; export with format='safetensors'")
    return worst


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CALL = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(\S[^\n]*)')


def reason(exc: BaseException) -> str:
    """Why an exporter failed, in one line: the innermost error's first line and, where the
    exporter tells it, the line of the model's code that raised it."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    inner = chain[-1]
    text = _ANSI.sub("", str(inner))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    detail = next((ln[2:] for ln in lines[1:] if ln.startswith("- ")), None)  # torch.export's constraint violations
    if detail is not None:
        first = f"{first.split('!')[0]}: {detail.split('. If ')[0]}"
    found = next((m for e in chain if (m := _CALL.search(_ANSI.sub("", str(e))))), None)
    where = f" (raised at {Path(found[1]).name}:{found[2]} in {found[3]}: {found[4].strip()})" if found else ""
    return f"{type(inner).__name__}: {first[:300]}{where}"


def _failed(format: str, model: MultiTaskModel, exc: BaseException) -> ExportError:
    return ExportError(f"architecture '{architecture_name(model)}' cannot be exported to {format}: {reason(exc)}; "
                       "expected a model whose forward pass has no branch on the values of the inputs nor on the batch "
                       "size as a Python int (format='safetensors' saves the weights of any model)")


# ------------------------------------------------------------------------------------ writers
def export_model(model: MultiTaskModel, path: str | Path, format: str | None = None, *, example: Tensor | None = None,
                 task: str | None = None, metadata: Mapping[str, Any] | None = None, verify: bool = True,
                 opset: int | None = None) -> Path:
    """Write ``model`` to ``path`` as ONNX, TorchScript or safetensors; returns the path.

    Args:
        model: the architecture (its weights as they are; put it in eval mode is done here).
        path: the file to write (parent folders are made).
        format: ``onnx``, ``torchscript`` or ``safetensors``; None: from the suffix of ``path``.
        example: a batch (≥ 2 rows) of inputs the traced graph is built from; its shape except the
            batch dimension is fixed in the file. Default: zeros of the width the model tells.
        task: for models with per-task input stems, the task whose inputs (and output) to export.
        metadata: extra JSON-able keys for the description the file carries (labels, preprocessing).
        verify: run the written ONNX/TorchScript file on a batch of another size and compare it
            with the PyTorch model (ONNX needs ``onnxruntime``); an error if they differ.
        opset: ONNX opset version (default: the exporter's).
    """
    if not isinstance(model, MultiTaskModel):
        raise InvalidParameterError(f"export needs a polytask MultiTaskModel or a loaded run; found {type(model).__name__}")
    fmt = resolve_format(path, format)
    path = Path(path)
    if fmt == "safetensors":  # weights need no input; the description names it when it is known
        outputs = list(model.task_names) if task is None else output_names(model, task)
        if example is None and _has_width(model, task):
            example = example_input(model, task)
        save_weights(model, path, describe(model, None if example is None else _check_input(example), outputs, metadata))
        return path
    outputs = output_names(model, task)
    if example is None:
        example = example_input(model, task)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = _check_input(example).to(device)
    info = describe(model, example, outputs, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        if fmt == "torchscript":
            _torchscript(model, path, example, outputs, task, info, verify)
        else:
            _onnx(model, path, example, outputs, task, info, verify, opset)
    finally:
        model.train(was_training)
    return path


def _torchscript(model: MultiTaskModel, path: Path, example: Tensor, outputs: list[str], task: str | None,
                 info: dict[str, Any], verify: bool) -> None:
    wrapper = _Outputs(model, outputs, task, as_dict=True)
    try:
        with _quiet():  # jit.trace's deprecation notice and its tracer warnings on shape checks
            traced = torch.jit.trace(wrapper, (example,), strict=False, check_trace=False)
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer, _extra_files={"polytask.json": json.dumps(info)})
    except Exception as exc:  # any tracer failure is reported as the architecture's
        raise _failed("torchscript", model, exc) from exc
    if verify:
        buffer.seek(0)
        with _quiet():
            loaded = torch.jit.load(buffer, map_location=example.device)
        probe = _probe(example)
        with torch.no_grad():
            got = {k: v.cpu() for k, v in loaded(probe).items()}
        _compare("torchscript", model, got, _reference(model, probe, outputs, task))
    path.write_bytes(buffer.getvalue())


def _onnx(model: MultiTaskModel, path: Path, example: Tensor, outputs: list[str], task: str | None,
          info: dict[str, Any], verify: bool, opset: int | None) -> None:
    require("onnxscript", "export")  # the torch.export-based exporter writes the graph with it
    wrapper = _Outputs(model, outputs, task, as_dict=False)
    name = input_name(model)
    try:  # torch.export first, by itself: its error names the line that fixed the batch size (the ONNX exporter
        # would fall back to a graph for the example's batch size only)
        with _quiet():
            exported = torch.export.export(wrapper, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},),
                                           strict=False)
    except Exception as exc:  # any tracing failure is reported as the architecture's
        raise _failed("onnx", model, exc) from exc
    try:
        with _quiet():
            program = torch.onnx.export(exported, (example,), None, dynamo=True, input_names=[name],
                                        output_names=outputs, opset_version=opset, verbose=False, report=False,
                                        verify=False)
    except Exception as exc:  # an operator without an ONNX translation
        raise _failed("onnx", model, exc) from exc
    if program is None:  # pragma: no cover - the dynamo exporter always returns its program
        raise ExportError("torch.onnx.export returned no program")
    program.model.metadata_props[METADATA_KEY] = json.dumps(info)
    with _quiet():
        program.save(str(path))
    if verify:
        probe = _probe(example)
        got = run_onnx(path, probe)
        _compare("onnx", model, got, _reference(model, probe, outputs, task))


def run_onnx(path: str | Path, x: Tensor | Any) -> dict[str, Any]:
    """Run an exported ONNX file with onnxruntime on CPU: ``{output name: numpy array}``."""
    ort = require("onnxruntime", "export")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    array = x.detach().cpu().numpy() if isinstance(x, Tensor) else x
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: array})))


def onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The polytask description an exported ONNX file carries."""
    ort = require("onnxruntime", "export")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise ExportError(f"{path} carries no polytask metadata; expected a file written by polytask.export")
    return json.loads(text)


# ---------------------------------------------------------------------------------- safetensors
def save_weights(model: MultiTaskModel, path: str | Path, info: Mapping[str, Any] | None = None) -> Path:
    """``model.state_dict()`` in a safetensors file, with ``info`` (default: :func:`describe` on the
    model's own input) as the JSON metadata entry ``polytask``."""
    st = require("safetensors.torch", "export")
    if info is None:
        info = describe(model, example_input(model) if _has_width(model, None) else None, list(model.task_names))
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        if tensor.numel():
            where = tensor.untyped_storage().data_ptr()
            if where in seen:  # safetensors refuses tensors sharing memory: store a copy (loading ties nothing)
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
        state[key] = tensor
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    st.save_file(state, str(path), metadata={METADATA_KEY: json.dumps(dict(info))})
    return path


def _has_width(model: MultiTaskModel, task: str | None) -> bool:
    try:
        example_input(model, task)
    except InvalidParameterError:
        return False
    return True


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The polytask description in a safetensors file written by :func:`save_weights`."""
    require("safetensors.torch", "export")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        text = (handle.metadata() or {}).get(METADATA_KEY)
    if text is None:
        raise ExportError(f"{path} carries no polytask metadata; expected a file written by polytask.export")
    return json.loads(text)


def load_weights(model: MultiTaskModel, path: str | Path, *, strict: bool = True) -> dict[str, Any]:
    """Load a safetensors file written by :func:`save_weights` into ``model`` (built as the saved
    one was); returns the file's polytask metadata. The tasks must match the file's."""
    st = require("safetensors.torch", "export")
    info = read_metadata(path)
    saved = [t["name"] for t in info.get("tasks", [])]
    if strict and saved and sorted(saved) != sorted(model.task_names):
        raise ExportError(f"{path} holds the weights of tasks {saved}; this model has tasks {list(model.task_names)}: "
                          "build the model with the tasks the file names")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    state = st.load_file(str(path), device=str(device))
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        lines = [ln.strip().rstrip(".") for ln in str(exc).splitlines() if ln.strip()][1:3]
        raise ExportError(f"{path} does not fit this model ({'; '.join(lines) or str(exc).splitlines()[0]}); expected a "
                          f"{info.get('architecture', 'polytask')} model built as the saved one was") from None
    return info
