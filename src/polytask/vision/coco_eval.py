"""mAP@0.5 and mAP@[.5:.95] by a COCO-evaluation package, and a torchmetrics wrapper that the
trainer's metric tracker feeds with raw detection predictions.

Backends: ``faster_coco_eval`` (default; faster-coco-eval, Apache-2.0, the COCOeval algorithm in
C++: a few hundred milliseconds where pycocotools takes seconds on thousands of images) and
``pycocotools`` (the reference implementation, BSD). The tests check that both give the same values.

COCO's average precision (Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014): per
class and IoU threshold, the area under the 101-point interpolated precision-recall curve; mAP is
the mean over classes (those with ground truth) and, for mAP@[.5:.95], over the IoU thresholds
0.50, 0.55, …, 0.95. At most 100 detections per image.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
import torch
import torchmetrics
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.vision.boxes import xyxy_to_xywh
from polytask.vision.detection import Decoder

BACKENDS = ("faster_coco_eval", "pycocotools")
INSTALL = {"faster_coco_eval": "pip install 'polytask[vision]'  (or: pip install faster-coco-eval)",
           "pycocotools": "pip install pycocotools"}


def _coco(backend: str = "faster_coco_eval"):
    if backend not in BACKENDS:
        raise InvalidParameterError(f"COCO-evaluation backend must be one of {', '.join(BACKENDS)}; found {backend!r}")
    try:
        if backend == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
        else:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as COCOeval
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InvalidParameterError(f"mAP needs {backend}, which is not installed: {INSTALL[backend]}") from exc
    return COCO, COCOeval


def coco_map(detections: Sequence[tuple[Tensor, Tensor, Tensor]], targets: Sequence[Tensor], num_classes: int,
             backend: str = "faster_coco_eval") -> dict[str, float]:
    """``{"map": mAP@[.5:.95], "map50": mAP@0.5}`` of per-image detections against ground truth.

    ``detections[i]`` = (boxes (M, 4) xyxy, scores (M,), labels (M,)); ``targets[i]`` = (K, 5) rows
    ``[class, x1, y1, x2, y2]`` (class −1 rows are padding). No ground-truth box at all: NaN
    (COCO's −1). Ground truth but not one detection: 0.
    """
    COCO, COCOeval = _coco(backend)
    images, annotations = [], []
    for i, rows in enumerate(targets):
        images.append({"id": i + 1})
        rows = rows[rows[:, 0] >= 0].double().cpu()
        for row in rows:
            x, y, w, h = xyxy_to_xywh(row[1:]).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(row[0]) + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    if not annotations:
        return {"map": float("nan"), "map50": float("nan")}
    results = []
    for i, (boxes, scores, labels) in enumerate(detections):
        for box, score, label in zip(xyxy_to_xywh(boxes.double().cpu()).tolist(), scores.tolist(), labels.tolist()):
            results.append({"image_id": i + 1, "category_id": int(label) + 1, "bbox": box, "score": float(score)})
    if not results:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary table
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations,
                         "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
        truth.createIndex()
        found = truth.loadRes(results)
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.params.imgIds = [image["id"] for image in images]  # images without any box or detection count too
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = np.asarray(evaluation.stats, dtype=np.float64)
    clean = lambda v: float("nan") if v < 0 else float(v)  # noqa: E731  (COCO writes −1 for "no ground truth")
    return {"map": clean(stats[0]), "map50": clean(stats[1])}


class MeanAveragePrecision(torchmetrics.Metric):
    """COCO mAP of a detection task: ``iou="coco"`` gives mAP@[.5:.95], ``iou=0.5`` mAP@0.5.

    ``update(prediction (N, A, 6 + C), target (N, K, 5))``: predictions are decoded (``Decoder``)
    and kept with their targets; ``compute`` runs pycocotools over everything seen."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, iou: str | float = "coco", decoder: Decoder | None = None,
                 backend: str = "faster_coco_eval", **kwargs) -> None:
        super().__init__(**kwargs)
        if iou not in ("coco", 0.5):
            raise InvalidParameterError(f"`iou` of MeanAveragePrecision must be 'coco' or 0.5; found {iou!r}")
        _coco(backend)  # fail when the metric is built, not at the end of the first epoch
        self.backend = backend
        self.num_classes, self.key = num_classes, "map" if iou == "coco" else "map50"
        self.decoder = decoder or Decoder()
        # one row per detection: image, x1, y1, x2, y2, score, class; one row per box: image, class, x1, y1, x2, y2
        self.add_state("found", default=[], dist_reduce_fx="cat")
        self.add_state("truth", default=[], dist_reduce_fx="cat")
        self.add_state("images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, prediction: Tensor, target: Tensor) -> None:
        # image ids unique across ranks, so that the rows torchmetrics gathers never mix two images
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        start = int(self.images) + rank * 10**12
        rows = []
        for i, (boxes, scores, labels) in enumerate(self.decoder(prediction)):
            image = torch.full((len(scores), 1), float(start + i), dtype=torch.float64, device=boxes.device)
            rows.append(torch.cat([image, boxes.double(), scores.double()[:, None], labels.double()[:, None]], dim=1))
        self.found.append(torch.cat(rows) if rows else torch.zeros(0, 7, dtype=torch.float64, device=prediction.device))
        image = (torch.arange(len(target), device=target.device, dtype=torch.float64) + start)[:, None, None]
        boxes = torch.cat([image.expand(-1, target.shape[1], 1), target.double()], dim=-1).reshape(-1, 6)
        self.truth.append(boxes[boxes[:, 1] >= 0])
        self.images += len(target)

    def compute(self) -> Tensor:
        found = _cat(self.found, 7)
        truth = _cat(self.truth, 6)
        # images with neither a box nor a detection take no part in COCO's AP: number the others 0..n-1
        ids, index = torch.unique(torch.cat([truth[:, 0], found[:, 0]]), return_inverse=True)
        truth, found = truth.clone(), found.clone()
        truth[:, 0], found[:, 0] = index[:len(truth)].double(), index[len(truth):].double()
        n = len(ids)
        targets = [rows[:, 1:] for rows in _per_image(truth, n)]
        detections = [(rows[:, 1:5], rows[:, 5], rows[:, 6].long()) for rows in _per_image(found, n)]
        return torch.tensor(coco_map(detections, targets, self.num_classes, self.backend)[self.key], dtype=torch.float64)


def _per_image(rows: Tensor, n: int) -> tuple[Tensor, ...]:
    """``rows`` (first column: image index) split into one block per image 0..n-1, by one sort."""
    rows = rows[rows[:, 0].argsort(stable=True)]
    return rows.split(torch.bincount(rows[:, 0].long(), minlength=n).tolist())


def _cat(values: list[Tensor] | Tensor, width: int) -> Tensor:
    if isinstance(values, Tensor):  # after a distributed sync torchmetrics hands one tensor
        return values.cpu()
    return torch.cat([v.cpu() for v in values]) if values else torch.zeros(0, width, dtype=torch.float64)
