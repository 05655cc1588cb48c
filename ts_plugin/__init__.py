"""ts_plugin: large-model serving on TorchServe."""
__version__ = "0.1.0"
