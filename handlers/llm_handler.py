"""--handler for every parallelType (pp, tp, pptp, custom): the engine is the one the config's parallelType names."""
from ts_plugin.handlers import LLMHandler as _LLMHandler


class LLMHandler(_LLMHandler):  # TorchServe serves the one class defined in the handler file itself
    pass
