"""ts_plugin's base handlers, one per parallelType; shipped as ts_plugin.bundled.handlers."""
