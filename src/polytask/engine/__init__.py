"""Per-task Jacobian / Gramian / feature Gramian and the one weighted backward."""

from polytask.engine.backward import Engine, backward
from polytask.engine.jacobian import gramian, task_jacobian

__all__ = ["Engine", "backward", "gramian", "task_jacobian"]
