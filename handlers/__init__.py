"""ts_plugin's base handler file (one for every parallelType); shipped as ts_plugin.bundled.handlers."""
