"""--handler for parallelType tp (DeepSpeed tensor parallelism)."""
from ts_plugin.handlers.tensor_parallel import DeepSpeedHandler


class TensorParallelHandler(DeepSpeedHandler):
    pass
