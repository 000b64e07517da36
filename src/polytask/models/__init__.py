"""Architectures, encoders and heads."""

from polytask.models import encoders
from polytask.models.base import ARCHITECTURES, MultiTaskModel
from polytask.models.hard_sharing import HardSharing
from polytask.models.heads import make_head

__all__ = ["ARCHITECTURES", "HardSharing", "MultiTaskModel", "encoders", "make_head"]
