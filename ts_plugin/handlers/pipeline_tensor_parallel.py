"""Old import path and name of the pptp handler; see ts_plugin.handlers.base."""
from .base import PPTPHandler as PipelineTensorParallelHandler

__all__ = ["PipelineTensorParallelHandler"]
