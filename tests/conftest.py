def pytest_configure(config):
    config.addinivalue_line(
        "markers", "serve: starts a real TorchServe (Java frontend and Python workers); deselect with -m 'not serve'")
