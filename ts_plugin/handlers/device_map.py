"""Old import path and name of the custom handler; see ts_plugin.handlers.base."""
from .base import AccelerateHandler as DeviceMapHandler

__all__ = ["DeviceMapHandler"]
