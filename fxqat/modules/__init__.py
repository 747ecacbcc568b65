"""QAT replacements for Ultralytics blocks (fused Conv+BN+SiLU) and their INT8 counterparts."""

from .blocks import QATBottleneckCSP, QATCSPLayer, QATDetectionHead, QATSPPF, blocks
from .conv_bn_act import ConvBnAct

__all__ = ["ConvBnAct", "QATCSPLayer", "QATBottleneckCSP", "QATSPPF", "QATDetectionHead", "blocks"]
