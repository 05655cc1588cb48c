"""The ts_plugin benchmark (`make bench`): bench.run (figures) and bench.serving (serving under load)."""
