"""Base handlers for TorchServe. `handlers/*.py` at the repository root are the files for --handler."""
from ._requests import RequestError, SamplingParams, TextRequest
from .base import ConfigError, LLMHandler

__all__ = ["ConfigError", "LLMHandler", "RequestError", "SamplingParams", "TextRequest"]
