"""The tests start the real TorchServe through the same controller the demo uses."""
from ts_plugin._torchserve import TorchServe, TorchServeError, free_ports, java_available

__all__ = ["TorchServe", "TorchServeError", "free_ports", "java_available"]
