"""Knowledge distillation from single-task teachers into one multi-task student.

- :mod:`~polytask.distill.kd`: output distillation losses (temperature KL with T², MSE);
- :mod:`~polytask.distill.annealing`: teacher annealing schedules λ(p) (BAM!);
- :mod:`~polytask.distill.objectives`: :class:`OutputDistillation`, the Trainer's ``objectives``;
- :mod:`~polytask.distill.feature`: :class:`FeatureDistillation` with per-task adaptors;
- :mod:`~polytask.distill.teachers`: teachers, their cached outputs and ``attach``.

Usage::

    teachers = build_teachers(tasks, {"income": income_model, "marital": "runs/marital"})
    cached = cached_outputs(teachers, train, "runs/student/teachers.pt")
    trainer = Trainer(model, tasks, method="uncertainty",
                      objectives=[OutputDistillation(tasks, temperature=2.0, anneal="linear")])
    trainer.fit(attach(train, cached), val)

See docs/distillation.md.
"""

from polytask.distill.annealing import ANNEALING, Schedule, build_schedule
from polytask.distill.feature import FeatureDistillation, feature_distance
from polytask.distill.kd import kd_loss, kd_rows, soft_targets
from polytask.distill.objectives import DISTILLATION, Objective, OutputDistillation, feature_key, progress, teacher_key
from polytask.distill.teachers import (
    Teacher,
    TeacherOutputs,
    as_teacher,
    attach,
    build_teachers,
    cached_outputs,
    compute_outputs,
    fingerprint,
    module_hash,
)

__all__ = ["ANNEALING", "DISTILLATION", "FeatureDistillation", "Objective", "OutputDistillation", "Schedule", "Teacher",
           "TeacherOutputs", "as_teacher", "attach", "build_schedule", "build_teachers", "cached_outputs",
           "compute_outputs", "feature_distance", "feature_key", "fingerprint", "kd_loss", "kd_rows", "module_hash",
           "progress", "soft_targets", "teacher_key"]
