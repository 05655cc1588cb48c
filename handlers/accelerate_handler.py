"""--handler for parallelType custom (HuggingFace Accelerate: one process, a device map over its GPUs, CPU and disk)."""
from ts_plugin.handlers.device_map import DeviceMapHandler


class AccelerateHandler(DeviceMapHandler):
    pass
