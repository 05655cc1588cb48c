"""ts_plugin's handler with a forward that raises on rank 1 alone, in a batch whose prompt holds MARKER: what a GPU
out-of-memory error on one rank looks like to the others (issue 29 item 2). A model whose name ends in "-gloo"
also cannot build DeepSpeed's shared-memory all-reduce, as on a host without a compiler, so tp all-reduces over
gloo."""
from ts_plugin.engines import _cpu_tp
from ts_plugin.handlers import LLMHandler

MARKER = "FAIL-ON-RANK-1"


class RankFailsHandler(LLMHandler):
    def initialize(self, context):
        if context.model_name.endswith("-gloo"):
            def no_compiler(*_):
                raise RuntimeError("no C++ compiler on this host (a test's stand-in)")

            _cpu_tp.load_shared_memory_op = no_compiler
        self.marked = False
        super().initialize(context)
        if self.model is not None and self.ranks.rank == 1:
            forward = self.model.forward

            def failing(*args, **kwargs):
                if self.marked:
                    raise RuntimeError("injected failure on rank 1 alone")
                return forward(*args, **kwargs)

            self.model.forward = failing

    def preprocess(self, data, routes=None):
        parsed = super().preprocess(data, routes)
        self.marked = any(MARKER in getattr(request, "prompt", "") for request in parsed)
        return parsed
