"""--handler for parallelType pp (pipeline parallelism over torch.distributed point-to-point)."""
from ts_plugin.handlers.pipeline import PipelineHandler


class PippyHandler(PipelineHandler):
    pass
