"""--handler for parallelType custom (HuggingFace Accelerate: one process, a device map over its GPUs, CPU and disk)."""
from ts_plugin.handlers import AccelerateHandler as _AccelerateHandler


class AccelerateHandler(_AccelerateHandler):
    pass
