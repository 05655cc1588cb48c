"""The base handler for TorchServe. `handlers/llm_handler.py` at the repository root is the file for --handler."""
from ..requests import RequestError, SamplingParams, TextRequest
from .base import ConfigError, LLMHandler

__all__ = ["ConfigError", "LLMHandler", "RequestError", "SamplingParams", "TextRequest"]
