"""--handler for parallelType tp (DeepSpeed tensor parallelism)."""
from ts_plugin.handlers import DeepSpeedHandler as _DeepSpeedHandler


class DeepSpeedHandler(_DeepSpeedHandler):
    pass
