"""--handler for parallelType pp under its old file name; handlers/pipeline_handler.py is the same handler."""
from ts_plugin.handlers import PipelineHandler


class PippyHandler(PipelineHandler):
    pass
