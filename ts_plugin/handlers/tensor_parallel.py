"""Old import path of the tp handler; see ts_plugin.handlers.base."""
from .base import DeepSpeedHandler

__all__ = ["DeepSpeedHandler"]
