"""Diagnostics of a multi-task run: gradient conflict, task affinity (TAG), task grouping, the HTML report.

``conflict`` reads the Gramians the engine already computes; ``affinity`` measures TAG's
lookahead affinity; ``grouping`` searches the best split of the tasks into groups; ``report``
(matplotlib, imported on use) writes one self-contained HTML page from run directories.
"""

from polytask.diagnostics.affinity import AffinityStats, OptimizerLookahead, lookahead_affinity, model_losses, sgd_update
from polytask.diagnostics.conflict import ConflictStats, cosines, norms
from polytask.diagnostics.grouping import MAX_TASKS, Grouping, best_grouping, exhaustive_grouping

__all__ = ["MAX_TASKS", "AffinityStats", "ConflictStats", "Grouping", "OptimizerLookahead", "best_grouping", "cosines",
           "exhaustive_grouping", "lookahead_affinity", "model_losses", "norms", "sgd_update"]
