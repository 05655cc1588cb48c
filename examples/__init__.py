"""One model-config.yaml per parallelType, and an invalid one; shipped as ts_plugin.bundled.examples."""
