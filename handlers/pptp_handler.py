"""--handler for parallelType pptp (pipeline stages, each tensor-parallel)."""
from ts_plugin.handlers import PPTPHandler as _PPTPHandler


class PPTPHandler(_PPTPHandler):
    pass
