"""Knowledge distillation (polytask.distill): KD losses, annealing, feature adaptors, teachers and their cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import polytask as pt
from polytask.core.errors import ConfigError, DataError, InvalidParameterError, ShapeError
from polytask.data.dataset import Batch, MultiOutputDataset, TaskDatasets
from polytask.distill import (
    ANNEALING,
    FeatureDistillation,
    OutputDistillation,
    TeacherOutputs,
    attach,
    build_schedule,
    build_teachers,
    cached_outputs,
    feature_distance,
    kd_loss,
    kd_rows,
)
from polytask.train.checkpoint import CheckpointError

TASKS = [pt.Task("income", "binary"), pt.Task("kind", "multiclass", num_classes=3), pt.Task("price", "regression")]
QUIET = {"progress": False}


def _data(n: int = 96, seed: int = 0, missing: bool = False) -> pt.MultiOutputDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = {"income": (x[:, 0] > 0).float(), "kind": (x[:, 1] > 0).long() + (x[:, 2] > 0.5).long(), "price": x[:, 3] * 2 + 1}
    masks = {"income": torch.arange(n) % 3 != 0} if missing else None
    return MultiOutputDataset(x, y, masks)


def _model(tasks=TASKS, seed: int = 0) -> pt.models.HardSharing:
    torch.manual_seed(seed)
    return pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[16, 8]), tasks)


def _teachers(seed: int = 1) -> dict[str, pt.models.HardSharing]:
    return {t.name: _model([t], seed=seed + i) for i, t in enumerate(TASKS)}


# ------------------------------------------------------------------------------------ KD losses
def test_kd_at_temperature_one_with_one_hot_teacher_is_cross_entropy() -> None:
    s = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3, 1])
    one_hot = F.one_hot(y, 4).float()
    kd = kd_loss(s, one_hot, "multiclass", temperature=1.0, probabilities=True)
    assert torch.allclose(kd, F.cross_entropy(s, y), atol=1e-6)
    # the same teacher as (saturated) logits
    assert torch.allclose(kd_loss(s, one_hot * 200.0, "multiclass"), F.cross_entropy(s, y), atol=1e-5)
    b = torch.randn(10, generator=torch.Generator().manual_seed(1))
    yb = (torch.arange(10) % 2).float()
    assert torch.allclose(kd_loss(b, yb, "binary", probabilities=True), F.binary_cross_entropy_with_logits(b, yb), atol=1e-6)
    m = torch.randn(10, 3, generator=torch.Generator().manual_seed(2))
    ym = (torch.rand(10, 3, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    assert torch.allclose(kd_loss(m, ym, "multilabel", probabilities=True),
                          F.binary_cross_entropy_with_logits(m, ym), atol=1e-6)


def test_kd_is_zero_when_the_student_matches_the_teacher_and_mse_for_regression() -> None:
    t = torch.randn(5, 3)
    for kind, logits in (("multiclass", t), ("multilabel", t), ("binary", t[:, 0])):
        assert kd_loss(logits.clone(), logits, kind, temperature=3.0).abs() < 1e-5  # float rounding × T²
    s, r = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    assert kd_loss(s, r, "regression", temperature=5.0) == pytest.approx(2.5)  # (1 + 4) / 2, T ignored


def test_t_squared_correction_gives_hintons_high_temperature_gradient() -> None:
    # Hinton et al. 2015, §2.1: at high T with zero-mean logits, ∂C/∂zᵢ ≈ (zᵢ − vᵢ)/(N T²) without the
    # T² factor, so with it the gradient tends to (zᵢ − vᵢ)/N (N classes), whatever T is.
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 5, generator=g), torch.randn(1, 5, generator=g)
    s, t = (s - s.mean()).requires_grad_(), t - t.mean()
    for T in (50.0, 200.0):
        (grad,) = torch.autograd.grad(kd_loss(s, t, "multiclass", temperature=T), s)
        assert torch.allclose(grad, (s.detach() - t) / 5, rtol=0.05, atol=1e-4)
        (raw,) = torch.autograd.grad(kd_loss(s, t, "multiclass", temperature=T, correction=False), s)
        assert torch.allclose(raw * T * T, grad, rtol=1e-4)
    # binary: the Bernoulli KL's gradient tends to (s − t)/4 (σ' = 1/4 at 0)
    sb = torch.tensor([0.3, -0.2], requires_grad=True)
    (gb,) = torch.autograd.grad(kd_loss(sb, torch.tensor([-0.1, 0.4]), "binary", temperature=100.0), sb)
    assert torch.allclose(gb, (sb.detach() - torch.tensor([-0.1, 0.4])) / 4 / 2, rtol=0.01)


def test_the_fused_kd_loss_is_the_mean_of_the_per_row_losses() -> None:
    g = torch.Generator().manual_seed(4)
    for kind, shape in (("multiclass", (9, 4)), ("multilabel", (9, 3)), ("binary", (9,)), ("regression", (9,))):
        s, t = torch.randn(*shape, generator=g, requires_grad=True), torch.randn(*shape, generator=g)
        mask = torch.arange(9) % 4 != 1
        for T in (1.0, 3.0):
            fused = kd_loss(s, t, kind, temperature=T, mask=mask)
            rows = kd_rows(s, t, kind, temperature=T)[mask].mean()
            assert torch.allclose(fused, rows, atol=1e-6), (kind, T)
            (g1,), (g2,) = torch.autograd.grad(fused, s), torch.autograd.grad(rows, s)
            assert torch.allclose(g1, g2, atol=1e-6), (kind, T)
    assert kd_loss(s, t, "binary", mask=torch.zeros(9, dtype=torch.bool)) is None


def test_kd_refuses_other_shapes_and_temperatures() -> None:
    with pytest.raises(ShapeError, match="task 'kind'.*shape"):
        kd_rows(torch.zeros(4, 3), torch.zeros(4, 2), "multiclass", task="kind")
    with pytest.raises(InvalidParameterError, match="temperature"):
        kd_rows(torch.zeros(4, 3), torch.zeros(4, 3), "multiclass", temperature=0)
    with pytest.raises(ShapeError, match="task 'kind'.*shape"):
        kd_loss(torch.zeros(4, 3), torch.zeros(4, 2), "multiclass", task="kind")


# ---------------------------------------------------------------------------------- annealing
def test_schedules() -> None:
    assert [build_schedule("linear")(p) for p in (0, 0.25, 1)] == [0.0, 0.25, 1.0]
    assert build_schedule("cosine")(0.5) == pytest.approx(0.5)
    assert build_schedule({"name": "step", "at": 0.3})(0.29) == 0.0 and build_schedule({"name": "step", "at": 0.3})(0.3) == 1.0
    assert build_schedule(0.7)(0.0) == build_schedule(0.7)(1.0) == 0.7
    exp = build_schedule({"name": "exponential", "rate": 3.0})
    assert exp(0.0) == 0.0 and exp(1.0) == pytest.approx(1.0) and exp(0.5) < 0.5
    assert set(ANNEALING.names()) == {"linear", "cosine", "exponential", "step", "constant"}
    with pytest.raises(InvalidParameterError, match="start"):
        build_schedule({"name": "linear", "start": 1.5})


def test_annealed_terms_are_the_cross_entropy_of_the_mixed_target() -> None:
    # BAM (Clark et al. 2019): CE(λ·y + (1 − λ)·p_teacher); our two terms have its gradient
    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 3, generator=g, requires_grad=True)
    t, y = torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)
    lam = 0.3
    ours = lam * F.cross_entropy(s, y) + (1 - lam) * kd_loss(s, t, "multiclass")
    mixed = lam * F.one_hot(y, 3).float() + (1 - lam) * torch.softmax(t, -1)
    bam = -(mixed * F.log_softmax(s, -1)).sum(-1).mean()
    (g1,), (g2,) = torch.autograd.grad(ours, s), torch.autograd.grad(bam, s)
    assert torch.allclose(g1, g2, atol=1e-6)


def _fit(objectives=(), data=None, method="equal", epochs=2, seed=0, **kw):
    data = data or _data()
    model = _model(seed=seed)
    trainer = pt.Trainer(model, TASKS, method=method, loop={"epochs": epochs, "batch_size": 16}, run=QUIET,
                         objectives=list(objectives), seed=seed, **kw)
    report = trainer.fit(data)
    return model, trainer, report


def _with_teachers(data, features=False):
    teachers = build_teachers(TASKS, _teachers())
    return attach(data, cached_outputs(teachers, data, features=features)), teachers


def test_annealing_at_lambda_one_is_plain_supervised_training_exactly() -> None:
    data = _data()
    distilled, _ = _with_teachers(data)
    plain, _, _ = _fit(data=_data())
    student, trainer, _ = _fit([OutputDistillation(TASKS, anneal=1.0, temperature=2.0)], data=distilled)
    for (name, a), b in zip(plain.state_dict().items(), student.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # the terms were offered to the method (and left out at λ = 1)
    assert trainer.loss_names == ("income", "kind", "price", "income:kd", "kind:kd", "price:kd")


def test_annealing_below_one_changes_training_and_the_method_balances_the_terms() -> None:
    distilled, _ = _with_teachers(_data())
    plain, _, _ = _fit(data=_data())
    objective = OutputDistillation(TASKS, anneal="linear")
    student, trainer, report = _fit([objective], data=distilled, method="uncertainty")
    assert not torch.equal(next(plain.parameters()), next(student.parameters()))
    assert trainer.method.all_tasks == trainer.loss_names
    assert trainer.method.log_vars.shape == (6,)  # one learnt weight per task and per distillation term
    assert all(trainer.weight_counts[f"{t.name}:kd"] > 0 for t in TASKS)
    assert set(report.metrics) == {"income", "kind", "price"}  # distillation terms are not tasks


def test_a_sample_without_label_still_learns_from_its_teacher() -> None:
    data = _data(missing=True)
    distilled, _ = _with_teachers(data)
    objective = OutputDistillation(TASKS, anneal=0.5)
    model = _model()
    trainer = pt.Trainer(model, TASKS, run=QUIET, objectives=[objective])
    trainer.check(distilled)
    unlabelled = torch.nonzero(~data.masks["income"]).flatten()[:4]
    batch = distilled.batch(unlabelled)
    losses, counts, _ = trainer._forward([batch], ["income", "kind", "price"])
    assert losses["income"] is None and losses["income:kd"] is not None and losses["income:kd"] > 0
    losses["income:kd"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.task_parameters("income"))


# ------------------------------------------------------------------------------------- features
def test_feature_loss_is_zero_for_an_identity_adaptor_on_identical_features() -> None:
    z = torch.randn(7, 8)
    objective = FeatureDistillation(TASKS, student_dim=8, teacher_dims=8)
    assert torch.equal(objective.adaptors["income"].weight, torch.eye(8))
    out = objective(None, Batch(z, {"teacher_features:income": z.clone() * 3.0}),
                    {"income": torch.zeros(7)}, z, {})
    assert list(out) == ["income:feat"] and float(out["income:feat"].detach()) == pytest.approx(0.0, abs=1e-6)
    assert feature_distance(z, -z) == pytest.approx(4.0)  # opposite unit vectors: ‖u − (−u)‖² = 4


def test_feature_distillation_trains_its_adaptors_with_their_own_settings_and_resumes(tmp_path) -> None:
    data = _data()
    distilled, _ = _with_teachers(data, features=True)
    objective = FeatureDistillation(TASKS, student_dim=8, teacher_dims=8, lr=0.05, weight_decay=0.0)
    before = objective.adaptors["kind"].weight.detach().clone()
    model, trainer, _ = _fit([objective, OutputDistillation(TASKS)], data=distilled, output_dir=tmp_path / "run")
    group = next(g for g in trainer.optimizer.param_groups if g.get("name") == "distill:adaptors")
    assert group["lr"] == 0.05 and group["weight_decay"] == 0.0
    assert not torch.equal(before, objective.adaptors["kind"].weight)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert torch.equal(saved["objectives"][0]["adaptors.kind.weight"], objective.adaptors["kind"].weight.detach())
    # a resumed trainer restores the adaptors
    fresh = FeatureDistillation(TASKS, student_dim=8, teacher_dims=8, lr=0.05, weight_decay=0.0)
    resumed = pt.Trainer(_model(), TASKS, method="equal", loop={"epochs": 2, "batch_size": 16}, run=QUIET,
                         objectives=[fresh, OutputDistillation(TASKS)], output_dir=tmp_path / "run", resume=True)
    resumed.fit(distilled)
    assert torch.equal(fresh.adaptors["kind"].weight, objective.adaptors["kind"].weight)


# --------------------------------------------------------------------------------------- cache
def test_cache_is_reused_and_stale_caches_are_refused(tmp_path) -> None:
    data = _data()
    teachers = build_teachers(TASKS, _teachers())
    cache = tmp_path / "teachers.pt"
    first = cached_outputs(teachers, data, cache)
    assert cache.exists()
    again = cached_outputs(teachers, data, cache)
    assert all(torch.equal(first.outputs[t], again.outputs[t]) for t in first.outputs)
    # another teacher (retrained weights): stale
    changed = _teachers()
    with torch.no_grad():
        next(changed["kind"].parameters()).add_(0.01)
    with pytest.raises(DataError, match="task 'kind' is stale"):
        cached_outputs(build_teachers(TASKS, changed), data, cache)
    # other data
    with pytest.raises(DataError, match="task 'income' was built from other data"):
        cached_outputs(teachers, _data(seed=5), cache)
    # refresh rebuilds; a corrupt file is one clear error
    cached_outputs(build_teachers(TASKS, changed), data, cache, refresh=True)
    cache.write_bytes(b"not a cache")
    with pytest.raises(DataError, match="cannot be read"):
        cached_outputs(teachers, data, cache)
    with pytest.raises(DataError, match="no teacher representation"):
        first.check(teachers, data, features=True)
    # a valid cache without representations is rebuilt with them when they are asked for
    cache.unlink()
    cached_outputs(teachers, data, cache)
    assert set(cached_outputs(teachers, data, cache, features=True).features) == {"income", "kind", "price"}
    assert set(TeacherOutputs.load(cache).features) == {"income", "kind", "price"}


def test_predictions_and_plain_modules_as_teachers() -> None:
    data = _data()
    preds = torch.randn(len(data), 3)
    teachers = build_teachers(TASKS, {"kind": preds, "income": nn.Linear(6, 1)})
    out = cached_outputs(teachers, data)
    assert torch.equal(out.outputs["kind"], preds) and out.outputs["income"].shape == (len(data),)
    assert set(attach(data, out).targets) == {"income", "kind", "price", "teacher:income", "teacher:kind"}


# -------------------------------------------------------------------------------------- bad input
def test_teachers_that_do_not_match_the_student_are_refused() -> None:
    wrong_kind = _model([pt.Task("kind", "binary")])
    with pytest.raises(ConfigError, match="task 'kind'.*is binary; expected multiclass with 3 classes"):
        build_teachers(TASKS, {"kind": wrong_kind})
    with pytest.raises(ConfigError, match="task 'kind'.*multiclass with 4 classes; expected multiclass with 3"):
        build_teachers(TASKS, {"kind": _model([pt.Task("kind", "multiclass", num_classes=4)])})
    with pytest.raises(ConfigError, match="task 'incme'.*income"):
        build_teachers(TASKS, {"incme": _model([TASKS[0]])})
    with pytest.raises(ConfigError, match="has tasks .* but not 'price'"):
        build_teachers(TASKS, {"price": _model(TASKS[:2])})
    with pytest.raises(ShapeError, match="task 'kind'.*shape \\(96, 2\\).*expects \\(N, 3\\)"):
        cached_outputs(build_teachers(TASKS, {"kind": nn.Linear(6, 2)}), _data())
    with pytest.raises(ShapeError, match="task 'kind'.*50 rows"):
        cached_outputs(build_teachers(TASKS, {"kind": torch.zeros(50, 3)}), _data())
    scaled = pt.Task("price", "regression", target_scaling=(1.0, 2.0))
    with pytest.raises(ConfigError, match="task 'price'.*standardised"):
        build_teachers(TASKS, {"price": _model([scaled])})


def test_missing_or_corrupt_teacher_checkpoints_are_clear_errors_and_change_nothing(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_teachers(TASKS, {"income": tmp_path / "nowhere"})
    run = tmp_path / "teacher"
    model = _model([TASKS[0]])
    pt.Trainer(model, [TASKS[0]], loop={"epochs": 1, "batch_size": 32}, run=QUIET, output_dir=run).fit(
        MultiOutputDataset(_data().x, {"income": _data().targets["income"]}))
    (run / "checkpoints" / "best.pt").write_bytes(b"garbage")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    from polytask.distill import as_teacher

    with pytest.raises(CheckpointError, match="best.pt"):
        from polytask.runs import load
        load(run, model=_model([TASKS[0]]))
    with pytest.raises((ConfigError, CheckpointError)):
        as_teacher(TASKS[0], run)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_objective_parameters_are_checked() -> None:
    with pytest.raises(InvalidParameterError, match="unknown task 'incom'"):
        OutputDistillation(TASKS, only=["incom"])
    with pytest.raises(InvalidParameterError, match="temperature"):
        OutputDistillation(TASKS, temperature={"kind": -1.0})
    with pytest.raises(InvalidParameterError, match="anneal"):
        OutputDistillation(TASKS, anneal=[1, 2])
    assert math.isclose(OutputDistillation(TASKS, anneal=0.25).schedule(0.9), 0.25)


def test_teacher_outputs_round_trip(tmp_path) -> None:
    data = _data()
    teachers = build_teachers(TASKS, _teachers())
    out = cached_outputs(teachers, data, features=True)
    loaded = TeacherOutputs.load(out.save(tmp_path / "c.pt"))
    loaded.check(teachers, data, features=True)
    assert loaded.features["income"].shape == (len(data), 8)


def test_one_data_set_per_task_each_batch_carries_its_own_teacher() -> None:
    full = _data()
    sets = TaskDatasets({t.name: MultiOutputDataset(full.x[i * 30:(i + 1) * 30 + 10],
                                                    {t.name: full.targets[t.name][i * 30:(i + 1) * 30 + 10]})
                         for i, t in enumerate(TASKS)})
    teachers = build_teachers(TASKS, _teachers())
    cached = cached_outputs(teachers, sets)
    distilled = attach(sets, cached)
    assert set(distilled.datasets["kind"].targets) == {"kind", "teacher:kind"}
    assert torch.equal(distilled.datasets["kind"].targets["teacher:kind"], teachers["kind"].run(sets.datasets["kind"].x)[0])
    model = _model()
    trainer = pt.Trainer(model, TASKS, loop={"epochs": 1, "batch_size": 8}, run=QUIET, objectives=[OutputDistillation(TASKS)])
    trainer.fit(distilled)
    assert all(trainer.weight_counts[f"{t.name}:kd"] > 0 for t in TASKS)
    with pytest.raises(DataError, match="task 'price' was built from other data"):
        other = MultiOutputDataset(sets.datasets["income"].x[:36], {"price": sets.datasets["price"].targets["price"]})
        cached.check(teachers, TaskDatasets({**sets.datasets, "price": other}))


def test_teacher_hash_covers_zero_dim_buffers_and_changes_with_any_weight() -> None:
    from polytask.distill import module_hash

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    key = module_hash(net)
    net[1].num_batches_tracked += 1  # a 0-d buffer
    assert module_hash(net) != key


def test_objective_terms_must_belong_to_a_task() -> None:
    class Stray:
        terms = {"income:extra": "nobody"}

    with pytest.raises(InvalidParameterError, match="objective terms .*income:extra.*must each belong"):
        pt.Trainer(_model(), TASKS, run=QUIET, objectives=[Stray()])
    with pytest.raises(InvalidParameterError, match="objective terms"):
        pt.Trainer(_model(), TASKS, run=QUIET, objectives=[OutputDistillation(TASKS), OutputDistillation(TASKS)])
