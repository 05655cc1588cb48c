"""ts_plugin's handler with every forward slowed by SLOW_S seconds: a batch that outlasts a short responseTimeout
(issue 29 item 4)."""
import time

from ts_plugin.handlers import LLMHandler

SLOW_S = 0.25


class SlowStepsHandler(LLMHandler):
    def initialize(self, context):
        super().initialize(context)
        if self.model is not None:
            forward = self.model.forward

            def slow(*args, **kwargs):
                time.sleep(SLOW_S)
                return forward(*args, **kwargs)

            self.model.forward = slow
