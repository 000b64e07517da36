"""Architectures, encoders and heads."""

from polytask.models import encoders
from polytask.models.aitm import AITM
from polytask.models.base import ARCHITECTURES, MultiTaskModel
from polytask.models.caml import CAML
from polytask.models.cross_stitch import CrossStitch
from polytask.models.dselect_k import DSelectK
from polytask.models.esmm import ESMM
from polytask.models.hard_sharing import HardSharing
from polytask.models.heads import DenseHead, make_head
from polytask.models.ltb import LTB
from polytask.models.mmoe import MMoE
from polytask.models.mtan import MTAN
from polytask.models.ple import CGC, PLE
from polytask.models.soft_sharing import SoftSharing
from polytask.models.task_branches import TaskBranches

__all__ = ["AITM", "ARCHITECTURES", "CAML",
           "CGC", "ESMM", "LTB", "MMoE", "MTAN", "PLE", "CrossStitch", "DSelectK", "DenseHead", "HardSharing",
           "MultiTaskModel", "SoftSharing", "TaskBranches", "encoders", "make_head"]
