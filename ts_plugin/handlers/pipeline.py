"""Old import path of the pp handler; see ts_plugin.handlers.base."""
from .base import PipelineHandler

__all__ = ["PipelineHandler"]
