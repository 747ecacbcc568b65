"""fxqat's data: the synthetic traffic-sign generator (default data) and image loading for calibration."""

from .signs import CLASSES, generate

__all__ = ["CLASSES", "generate"]
