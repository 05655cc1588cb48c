"""One rank that `ts-plugin join` starts: load the archive as TorchServe's worker would, then serve global rank 0
until its worker ends. Run by torchrun: `python -m ts_plugin._joined_rank MODEL_DIR`."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import ModelLoaderFactory

    import ts

    logging.basicConfig(level=logging.INFO, format="%(asctime)s [joined rank %(process)d] %(levelname)s %(message)s")
    model_dir = Path((argv or sys.argv[1:])[0]).resolve()
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text(encoding="utf-8"))["model"]
    # as TorchServe runs a worker: in the model folder, with it on the path (the handler file is there)
    os.chdir(model_dir)
    sys.path.insert(0, str(model_dir))
    metrics = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = manifest["modelName"]
    service = ModelLoaderFactory.get_model_loader().load(
        manifest["modelName"], str(model_dir), manifest["handler"], int(os.environ.get("LOCAL_RANK", "0")),
        None, metrics_cache=metrics)
    handler = service._entry_point.__self__  # the handler's bound `handle` (ts_plugin's handlers are classes)
    serving = handler.follower or handler.step_loop
    if serving is None:
        logging.error("this rank has nothing to serve: a rank on another node than the frontend's needs a pipeline "
                      "stage or continuousBatching (the validator's TSP221)")
        return 2
    error = serving.wait()
    if error is not None:
        logging.error("leaving the rendezvous: %s: %s", type(error).__name__, error)
        return 1
    logging.info("rank 0's worker has ended; leaving the rendezvous")
    return 0


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    # at once: an orderly exit would wait on the process group and its peers, which are gone
    os._exit(code)
