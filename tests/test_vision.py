"""Vision kinds (segmentation, dense_regression, detection): box maths against hand values, mAP
against hand-computed COCO values and both evaluation packages, ignore index, padded (ragged) box
lists, missing box labels, bad input, heads on every feature-map architecture and every compare mode."""

from __future__ import annotations

import pytest
import torch

import polytask as pt
from polytask.core.errors import DataError, InvalidParameterError, ShapeError
from polytask.data import MultiOutputDataset
from polytask.engine import Engine
from polytask.metrics import METRICS
from polytask.models import ARCHITECTURES
from polytask.models.encoders import ENCODERS
from polytask.vision import boxes as B
from polytask.vision.coco_eval import coco_map
from polytask.vision.detection import Decoder, DetectionLoss, assign

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (16, 16)


def t(values):
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ boxes
def test_box_conversions_by_hand():
    assert torch.equal(B.xywh_to_xyxy(t([1, 2, 3, 4])), t([1, 2, 4, 6]))
    assert torch.equal(B.xyxy_to_xywh(t([1, 2, 4, 6])), t([1, 2, 3, 4]))
    assert torch.equal(B.cxcywh_to_xyxy(t([2, 3, 2, 2])), t([1, 2, 3, 4]))
    assert torch.equal(B.xyxy_to_cxcywh(t([1, 2, 3, 4])), t([2, 3, 2, 2]))
    boxes = torch.rand(10, 4, dtype=torch.float64) * 10
    assert torch.allclose(B.xywh_to_xyxy(B.xyxy_to_xywh(boxes)), boxes)
    assert torch.allclose(B.cxcywh_to_xyxy(B.xyxy_to_cxcywh(boxes)), boxes)
    # a pixel (row r, col c) covers [c, c + 1) x [r, r + 1)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:5, 3] = True
    assert torch.equal(B.boxes_from_mask(mask), torch.tensor([3.0, 2.0, 4.0, 5.0]))


def test_iou_and_giou_by_hand():
    a, b = t([0, 0, 2, 2]), t([1, 1, 3, 3])       # overlap 1, union 7, enclosing box 3x3
    assert float(B.iou(a, b)) == pytest.approx(1 / 7)
    assert float(B.giou(a, b)) == pytest.approx(1 / 7 - 2 / 9)
    far = t([2, 0, 3, 1])                          # disjoint from [0,0,1,1]: union 2, enclosing 3
    assert float(B.iou(t([0, 0, 1, 1]), far)) == 0.0
    assert float(B.giou(t([0, 0, 1, 1]), far)) == pytest.approx(-1 / 3)
    assert float(B.giou(a, a)) == pytest.approx(1.0)
    assert torch.allclose(B.pairwise_iou(torch.stack([a, b]), torch.stack([a, b])),
                          t([[1, 1 / 7], [1 / 7, 1]]), atol=1e-6)


def test_nms_keeps_the_best_of_overlapping_boxes_per_class():
    boxes = t([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = t([0.9, 0.8, 0.7, 0.6])
    assert B.nms(boxes, scores, 0.5).tolist() == [0, 2]
    labels = torch.tensor([0, 0, 0, 1])
    assert sorted(B.batched_nms(boxes, scores, labels, 0.5).tolist()) == [0, 2, 3]


# -------------------------------------------------------------------------------------------- mAP
def test_map_matches_hand_values_and_both_packages():
    """Two images, one box each (class 0). Detections: a false positive scored 0.95, a perfect box
    (0.9) and a box of IoU 0.62 (0.8). IoU thresholds 0.50-0.60: ranks FP, TP, TP, so precision
    2/3 at every recall: AP = 2/3. Thresholds 0.65-0.95 (7 of 10): FP, TP, FP: recall stops at
    0.5 with precision 1/2, so 51 of COCO's 101 recall points have precision 1/2."""
    targets = [t([[0, 0, 0, 10, 10]]), t([[0, 0, 0, 10, 10]])]
    detections = [(t([[50, 50, 60, 60], [0, 0, 10, 10]]), t([0.95, 0.9]), torch.tensor([0, 0])),
                  (t([[0, 0, 10, 6.2]]), t([0.8]), torch.tensor([0]))]
    expected_map = (3 * (2 / 3) + 7 * 0.5 * 51 / 101) / 10
    for backend in ("faster_coco_eval", "pycocotools"):
        pytest.importorskip(backend)
        found = coco_map(detections, targets, num_classes=1, backend=backend)
        assert found["map50"] == pytest.approx(2 / 3, abs=1e-6)
        assert found["map"] == pytest.approx(expected_map, abs=1e-6)


def test_map_edge_cases_and_metric_wrapper():
    targets = [t([[1, 0, 0, 10, 10], [-1, 0, 0, 0, 0]])]
    assert coco_map([(t([[0, 0, 10, 10]]), t([0.9]), torch.tensor([1]))], targets, 2) == {"map": 1.0, "map50": 1.0}
    assert coco_map([(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))], targets, 2) == {"map": 0.0,
                                                                                                             "map50": 0.0}
    empty = coco_map([(t([[0, 0, 10, 10]]), t([0.9]), torch.tensor([1]))], [t([[-1, 0, 0, 0, 0]])], 2)
    assert all(v != v for v in empty.values())  # no ground truth: NaN, not a number that looks like a score
    with pytest.raises(InvalidParameterError, match="backend"):
        coco_map([], targets, 2, backend="torchvision")
    # the torchmetrics wrapper fed with a head output whose best cell predicts the box exactly
    task = pt.Task("det", kind="detection", num_classes=2, size=SIZE)
    prediction = perfect_prediction(targets=torch.tensor([[[1.0, 2, 2, 10, 10]]]), num_classes=2)
    metric = METRICS.build(task)
    for m in metric.values():
        m.update(prediction, torch.tensor([[[1.0, 2, 2, 10, 10]]]))
    assert {k: float(m.compute()) for k, m in metric.items()} == {"map50": 1.0, "map": 1.0}


def perfect_prediction(targets: torch.Tensor, num_classes: int, stride: int = 4) -> torch.Tensor:
    """A (N, A, 6 + C) prediction on a 4x4 grid whose assigned cells give the target boxes with a
    high score and every other cell a low one."""
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    centres = torch.stack([(xs.flatten() + 0.5) * stride, (ys.flatten() + 0.5) * stride], -1).float()
    out = torch.zeros(len(targets), 16, 6 + num_classes)
    out[..., :2] = centres
    out[..., 2:6] = 1.0
    out[..., 6:] = -10.0
    matched = assign(centres, targets)
    for i in range(len(targets)):
        for a in range(16):
            k = int(matched[i, a])
            if k >= 0:
                cls, x1, y1, x2, y2 = targets[i, k].tolist()
                cx, cy = centres[a].tolist()
                out[i, a, 2:6] = torch.tensor([cx - x1, cy - y1, x2 - cx, y2 - cy])
                out[i, a, 6 + int(cls)] = 10.0
    return out


# ------------------------------------------------------------------------------ detection pieces
def test_assignment_inside_smallest_and_nearest_cell():
    centres = torch.tensor([[2.0, 2.0], [6.0, 2.0], [2.0, 6.0], [6.0, 6.0]])  # a 2x2 grid, stride 4
    target = torch.tensor([[[0.0, 0, 0, 8, 8],      # big box: every centre inside
                            [1.0, 0, 0, 4, 4],      # small box: centre (2, 2) inside, smaller: wins it
                            [2.0, 6.5, 6.5, 7.0, 7.0],  # tinier than a cell, no centre inside: nearest cell (6, 6)
                            [-1.0, 0, 0, 8, 8]]])   # padding: never assigned
    assert assign(centres, target).tolist() == [[1, 0, 0, 2]]


def test_detection_loss_padding_rows_change_nothing_and_perfect_boxes_cost_little():
    target = torch.tensor([[[1.0, 2, 2, 10, 10], [0.0, 9, 1, 15, 7]], [[0.0, 4, 4, 12, 14], [-1.0, 0, 0, 0, 0]]])
    prediction = perfect_prediction(target, num_classes=2)
    loss = DetectionLoss(num_classes=2)
    padded = torch.cat([target, torch.tensor([[[-1.0, 0, 0, 0, 0]]]).expand(2, 3, 5)], dim=1)  # K 2 -> 5
    assert torch.equal(loss(prediction, target), loss(prediction, padded))
    parts = loss.parts(prediction, target)
    assert float(parts["l1"]) < 1e-6 and float(parts["giou"]) < 1e-6 and float(parts["focal"]) < 1e-3
    noisy = prediction.clone()
    noisy[..., 2:6] += 1.5
    assert loss(noisy, target) > loss(prediction, target) + 0.1


def test_decoder_returns_the_boxes_and_drops_duplicates():
    target = torch.tensor([[[1.0, 2, 2, 10, 10], [0.0, 9, 1, 15, 7]]])
    found = Decoder().padded(perfect_prediction(target, num_classes=2))
    kept = found[0][found[0, :, 5] >= 0]
    # every cell assigned to a box predicts it exactly: Fast NMS keeps one per box
    assert sorted(kept[:, [5, 0, 1, 2, 3]].tolist()) == sorted(target[0].tolist())


# --------------------------------------------------------------------------- per-pixel kinds
def test_segmentation_ignore_index_in_loss_and_metrics():
    task = pt.Task("seg", kind="segmentation", num_classes=3, size=(2, 2))
    logits = torch.tensor([[[[5.0, 0.0], [0.0, 0.0]], [[0.0, 5.0], [0.0, 0.0]], [[0.0, 0.0], [5.0, 5.0]]]])
    target = torch.tensor([[[0, 1], [-1, -1]]])  # the two bottom pixels (predicted class 2) are unlabelled
    expected = torch.nn.functional.cross_entropy(logits[:, :, 0, :], target[:, 0, :])
    assert float(task.loss(logits, target)) == pytest.approx(float(expected))
    # every pixel unlabelled: a zero loss that still has a gradient path, not NaN
    loss = task.loss(logits.requires_grad_(), torch.full((1, 2, 2), -1))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    metrics = METRICS.build(task)
    for m in metrics.values():
        m.update(logits.detach(), target)
    assert float(metrics["pixel_accuracy"].compute()) == 1.0  # the wrong bottom pixels do not count


def test_dense_regression_nan_pixels_are_ignored():
    task = pt.Task("depth", kind="dense_regression", size=(2, 2))
    prediction = torch.tensor([[[1.0, 2.0], [3.0, 100.0]]])
    target = torch.tensor([[[2.0, 2.0], [1.0, float("nan")]]])
    assert float(task.loss(prediction, target)) == pytest.approx((1 + 0 + 2) / 3)
    metrics = METRICS.build(task)
    for m in metrics.values():
        m.update(prediction, target)
    assert float(metrics["abs_error"].compute()) == pytest.approx(1.0)
    assert float(metrics["rel_error"].compute()) == pytest.approx((0.5 + 0 + 2) / 3)
    MultiOutputDataset(torch.zeros(1, 1, 2, 2), {"depth": target}).validate([task])  # NaN pixels are allowed


# ------------------------------------------------------------------------- ragged and missing
def detection_data(n: int = 6, k: int = 3) -> tuple[MultiOutputDataset, pt.Task]:
    g = torch.Generator().manual_seed(0)
    target = torch.full((n, k, 5), 0.0)
    target[..., 0] = -1
    for i in range(n):
        for j in range(i % k + 1):  # 1, 2, 3, 1, ... boxes: a ragged list padded to k rows
            x, y = torch.randint(0, 8, (2,), generator=g).tolist()
            target[i, j] = torch.tensor([j % 2, x, y, x + 6, y + 5], dtype=torch.float32)
    task = pt.Task("det", kind="detection", num_classes=2, size=SIZE)
    return MultiOutputDataset(torch.rand(n, 1, *SIZE, generator=g), {"det": target}), task


def test_ragged_box_lists_batch_by_rows():
    data, task = detection_data()
    data.validate([task])
    batch = data.batch(torch.tensor([4, 0, 2]))
    assert batch.targets["det"].shape == (3, 3, 5)
    assert (batch.targets["det"][:, :, 0] >= 0).sum(1).tolist() == [2, 1, 3]


def test_missing_box_labels_are_masked_rows():
    data, task = detection_data()
    mask = torch.tensor([True, False, True, False, True, True])
    data.targets["det"][~mask] = float("nan")  # whatever an unlabelled row holds is not read
    masked = MultiOutputDataset(data.x, data.targets, {"det": mask})
    masked.validate([task])
    prediction = torch.randn(6, 16, 8)
    expected = task.loss(prediction[mask], masked.targets["det"][mask])
    assert torch.equal(task.loss(prediction, masked.targets["det"], mask), expected)
    assert task.loss(prediction, masked.targets["det"], torch.zeros(6, dtype=torch.bool)) is None
    # an image labelled "no object" (only padding rows) is not a missing label: its cells are all negatives
    empty = torch.full((1, 3, 5), 0.0)
    empty[..., 0] = -1
    assert float(task.loss(torch.randn(1, 16, 8), empty)) > 0


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("row", "expected"), [
    ([0.0, 2, 2, 20, 10], "sample 3, box 1 is .* expected x2 <= 16 and y2 <= 16"),
    ([0.0, -1, 2, 5, 10], "sample 3, box 1 .* expected x1 >= 0 and y1 >= 0"),
    ([0.0, 8, 2, 5, 10], "sample 3, box 1 .* expected x2 > x1"),
    ([0.0, 2, 9, 5, 3], "sample 3, box 1 .* expected y2 > y1"),
    ([2.0, 2, 2, 5, 10], "sample 3, box 1 has class 2; expected an integer in \\[0, 1\\]"),
    ([0.5, 2, 2, 5, 10], "sample 3, box 1 has class 0.5"),
])
def test_bad_boxes_are_one_clear_error(row, expected):
    data, task = detection_data()
    data.targets["det"][3, 1] = torch.tensor(row)
    with pytest.raises(DataError, match=f"detection task 'det'.*{expected}"):
        data.validate([task])


def test_bad_per_pixel_targets_are_one_clear_error():
    seg = pt.Task("seg", kind="segmentation", num_classes=3, size=(4, 4))
    with pytest.raises(DataError, match=r"segmentation task 'seg' must be one map per image of shape \(n, 4, 4\); found \(2, 4, 5\)"):
        MultiOutputDataset(torch.zeros(2, 1, 4, 4), {"seg": torch.zeros(2, 4, 5, dtype=torch.long)}).validate([seg])
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[1, 2, 2] = 3
    with pytest.raises(DataError, match=r"sample 1 has pixel label 3; expected a class in \[0, 2\] or -1"):
        MultiOutputDataset(torch.zeros(2, 1, 4, 4), {"seg": labels}).validate([seg])
    depth = pt.Task("depth", kind="dense_regression", size=(4, 4))
    with pytest.raises(DataError, match=r"dense_regression task 'depth' must be one map per image of shape \(n, 4, 4\)"):
        MultiOutputDataset(torch.zeros(2, 1, 4, 4), {"depth": torch.zeros(2, 16)}).validate([depth])
    with pytest.raises(DataError, match=r"detection task 'det' must have shape \(n, K, 5\)"):
        MultiOutputDataset(torch.zeros(2, 1, 4, 4), {"det": torch.zeros(2, 4)}).validate(
            [pt.Task("det", kind="detection", num_classes=1)])
    with pytest.raises(InvalidParameterError, match="`size` of task 'r'"):
        pt.Task("r", kind="regression", size=(4, 4))
    with pytest.raises(InvalidParameterError, match="`num_classes` of segmentation task 's' must be an int >= 2"):
        pt.Task("s", kind="segmentation")


# ---------------------------------------------------------------- heads on every architecture
VISION_TASKS = [pt.Task("seg", kind="segmentation", num_classes=3, size=SIZE),
                pt.Task("det", kind="detection", num_classes=2, size=SIZE),
                pt.Task("depth", kind="dense_regression", size=SIZE),
                pt.Task("cls", kind="multiclass", num_classes=3)]


def vision_batch(n: int = 4):
    data, _ = detection_data(n)
    return data.x, {"seg": torch.randint(-1, 3, (n, *SIZE)), "det": data.targets["det"],
                    "depth": torch.rand(n, *SIZE), "cls": torch.randint(0, 3, (n,))}


@pytest.mark.parametrize("architecture", ["hard_sharing", "task_branches", "mtan"])
def test_vision_heads_plug_into_feature_map_architectures(architecture):
    encoder = ENCODERS.create("cnn_map", image_size=list(SIZE), channels=[4, 8])
    model = ARCHITECTURES.create(architecture, encoder=encoder, tasks=VISION_TASKS)
    x, y = vision_batch()
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"seg": (4, 3, 16, 16), "det": (4, 16, 8), "depth": (4, 16, 16),
                                                            "cls": (4, 3)}
    compares = [("upgrad", "shared"), ("pcgrad", "last_shared")]
    if model.shares_representation:
        compares.append(("mgda", "features"))
    for method, compare in compares:
        model.zero_grad(set_to_none=True)
        engine = Engine(method, model.shared_parameters(), last_shared_params=model.last_shared_parameters(), compare=compare)
        z = model.encode(x)
        outputs = model.decode(z)
        losses = {t.name: t.loss(outputs[t.name], t.cast_targets(y[t.name])) for t in VISION_TASKS}
        weights = engine.backward(losses, features=[z]).weights
        assert set(weights) == {t.name for t in VISION_TASKS}
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.shared_parameters())


def test_vision_task_needs_a_feature_map():
    encoder = ENCODERS.create("cnn", in_channels=1, channels=[4], out_features=8)
    with pytest.raises(InvalidParameterError, match="segmentation task 'seg' needs an encoder that exposes its feature map"):
        ARCHITECTURES.create("hard_sharing", encoder=encoder, tasks=VISION_TASKS[:1])
    with pytest.raises(InvalidParameterError, match="must be divisible by 2\\^2 = 4"):
        ENCODERS.create("cnn_map", image_size=[18, 16], channels=[4, 8])
    model = ARCHITECTURES.create("hard_sharing", encoder=ENCODERS.create("cnn_map", image_size=[8, 8], channels=[4]),
                                 tasks=[pt.Task("seg", kind="segmentation", num_classes=3, size=SIZE)])
    with pytest.raises(ShapeError, match=r"expected \(batch, 3, 16, 16\)"):
        model.tasks["seg"].prepare_prediction(torch.zeros(2, 3, 8, 8))


@pytest.mark.slow
def test_trainer_fits_detection_and_segmentation_in_features_mode(tmp_path):
    """A few Trainer epochs with a Gramian method comparing on the feature map: finite metrics for
    every vision kind, and the run directory's plot drawn."""
    n = 24
    x, y = vision_batch(n)
    data = MultiOutputDataset(x, y)
    model = ARCHITECTURES.create("hard_sharing", encoder=ENCODERS.create("cnn_map", image_size=list(SIZE), channels=[4, 8]),
                                 tasks=VISION_TASKS)
    trainer = pt.Trainer(model, VISION_TASKS, method="upgrad", engine={"compare": "features"},
                         loop={"epochs": 2, "batch_size": 8}, run={"progress": False}, output_dir=tmp_path / "run")
    report = trainer.fit(data, data)
    for task in VISION_TASKS:
        assert all(v == v for v in report.metrics[task.name].values()), task.name
    assert (tmp_path / "run" / "training.png").exists()


@pytest.mark.slow
def test_detection_example_trains_evaluates_and_predicts_from_yaml(tmp_path):
    """examples/image_detection_classification.yaml on a few images for one epoch, then eval and
    predict: the detections come back as one JSON list per image."""
    import json
    from pathlib import Path

    import numpy as np

    from polytask.cli.main import main
    from polytask.datasets import load

    example = Path(__file__).resolve().parents[1] / "examples" / "image_detection_classification.yaml"
    run = tmp_path / "run"
    assert main(["train", str(example), "--quiet", "--set", "data.options={train_size: 48, val_size: 16, test_size: 16}",
                 "--set", "train.epochs=1", "--set", f"output_dir={run}"]) == 0
    assert main(["eval", str(run)]) == 0
    np.save(tmp_path / "x.npy", load("multimnist_boxes", train_size=4, val_size=2, test_size=3).test.x.numpy())
    assert main(["predict", str(run), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "p.csv")]) == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "p.csv")
    assert list(table.columns) == ["id", "digits", "largest", "largest_probability"] and len(table) == 3
    for cell in table["digits"]:
        assert all(len(row) == 6 and 0 <= row[5] < 10 for row in json.loads(cell))


def test_vision_tasks_from_yaml_keep_their_size_and_fill_the_encoder():
    """tasks.NAME entries of a bundled vision data set keep the task's image size; `cnn_map` takes
    in_channels and image_size from the images; the segmentation head outputs their size."""
    from polytask.config.build import build_model, encoder_spec, load_data
    from polytask.config.schema import Config

    cfg = Config.model_validate({
        "data": {"dataset": "multimnist_boxes", "options": {"train_size": 16, "val_size": 8, "test_size": 8}},
        "tasks": {"segmentation": {}, "digits": {"loss": {"name": "fcos", "giou_weight": 1.0}}, "count": {}},
        "model": {"encoder": {"name": "cnn_map", "channels": [4, 8]}}})
    loaded, _ = load_data(cfg)
    tasks = {t.name: t for t in loaded.tasks}
    assert tasks["segmentation"].size == (48, 48) and tasks["digits"].size == (48, 48)
    assert tasks["digits"].loss.params == {"giou_weight": 1.0}
    spec = encoder_spec(cfg, loaded)
    assert spec["image_size"] == [48, 48] and spec["in_channels"] == 1
    model = build_model(cfg, loaded.tasks, spec)
    out = model(loaded.train.x[:2])
    assert tuple(out["segmentation"].shape) == (2, 11, 48, 48) and tuple(out["digits"].shape) == (2, 144, 16)


@pytest.mark.slow
def test_segmentation_detection_example_with_baselines_on_the_feature_map(tmp_path):
    """examples/image_segmentation_detection.yaml (upgrad, engine.compare: features) with
    --baselines: the single-task runs use `equal`, for which the multi-task run's compare mode
    does not apply, and every task gets its baseline."""
    import json
    from pathlib import Path

    from polytask.cli.main import main

    example = Path(__file__).resolve().parents[1] / "examples" / "image_segmentation_detection.yaml"
    run = tmp_path / "run"
    assert main(["train", str(example), "--quiet", "--baselines", "--set",
                 "data.options={train_size: 32, val_size: 16, test_size: 16}", "--set", "train.epochs=1",
                 "--set", f"output_dir={run}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["baselines"]) == {"segmentation", "digits"}
    assert {"miou", "pixel_accuracy"} <= set(summary["tasks"]["segmentation"])
