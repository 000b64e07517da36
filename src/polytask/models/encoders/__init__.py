"""Encoders: map an input batch to a (batch, out_features) shared representation."""

from polytask.models.encoders.base import ENCODERS
from polytask.models.encoders.cnn import CNN
from polytask.models.encoders.cnn_map import CNNFeatureMap
from polytask.models.encoders.co_attention import CoAttention
from polytask.models.encoders.fused import Fused
from polytask.models.encoders.mlp import MLP
from polytask.models.encoders.pretrained_text import PretrainedText
from polytask.models.encoders.resnet import ResNet
from polytask.models.encoders.tabular import Tabular
from polytask.models.encoders.text import Text

__all__ = ["CNN", "CNNFeatureMap", "ENCODERS", "CoAttention", "MLP", "Fused", "PretrainedText", "ResNet", "Tabular", "Text"]
