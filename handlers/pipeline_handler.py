"""--handler for parallelType pp (pipeline stages over torch.distributed point-to-point)."""
from ts_plugin.handlers import PipelineHandler as _PipelineHandler


class PipelineHandler(_PipelineHandler):
    pass
