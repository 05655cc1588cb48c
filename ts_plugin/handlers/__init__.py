"""Base handlers for TorchServe. `handlers/*.py` at the repository root are the files for --handler."""
from ..requests import RequestError, SamplingParams, TextRequest
from .base import AccelerateHandler, ConfigError, DeepSpeedHandler, LLMHandler, PipelineHandler, PPTPHandler

__all__ = ["AccelerateHandler", "ConfigError", "DeepSpeedHandler", "LLMHandler", "PipelineHandler", "PPTPHandler",
           "RequestError", "SamplingParams", "TextRequest"]
