"""--handler for parallelType pptp (pipeline stages, each tensor-parallel)."""
from ts_plugin.handlers.pipeline_tensor_parallel import PipelineTensorParallelHandler


class PPTPHandler(PipelineTensorParallelHandler):
    pass
