"""The validation rules of model-config.yaml: each rule code tripped, and a near config that does not trip it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import pytest

from ts_plugin.config import RULES, ValidationContext, validate_file, validate_text

# a copy of shared/parallel-type-config.txt (TorchServe's documented examples), kept with the tests so that
# they do not depend on where shared/ lies beside a clone
DOCUMENTED = Path(__file__).resolve().parent / "data" / "parallel-type-config.txt"

TP2 = "parallelType: tp\ntorchrun:\n  nproc-per-node: 2\n"  # a valid tp config, 3 lines
PP_ACROSS = "parallelType: pp\ntorchrun:\n  nproc-per-node: 1\n  nnodes: 2\n  rdzv-endpoint: 10.0.0.1:29411\n"
PPTP4 = "parallelType: pptp\ntorchrun:\n  nproc-per-node: 4\n"
OWN_RDZV = "  rdzv-endpoint: localhost:29501\n"  # a torchrun line: a rendezvous of the model's own (no TSP212)


# --- contexts that need files: a function of a folder holding the JSON files below ------------------

JSON_FILES = {
    "ds-tp2.json": json.dumps({"tensor_parallel": {"tp_size": 2}}),
    "ds-tp4.json": json.dumps({"tensor_parallel": {"tp_size": 4}}),
    "ds-mp3.json": json.dumps({"mp_size": 3}),
    "not-json.json": "{'tensor_parallel': ",
    "heads9.json": json.dumps({"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}),
    "heads8.json": json.dumps({"num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 512}),
    "ck.json": json.dumps({"type": "ds_model", "checkpoints": ["w0.pt"]}),
}

Ctx = Optional[Callable[[Path], ValidationContext]]


def archive(**files: str) -> Callable[[Path], ValidationContext]:
    """archive-relative name -> one of JSON_FILES"""
    return lambda folder: ValidationContext(archive_files={name: folder / src for name, src in files.items()})


def beside(folder: Path) -> ValidationContext:
    return ValidationContext(config_dir=folder)


def gpus(n: int) -> Callable[[Path], ValidationContext]:
    return lambda folder: ValidationContext(gpus=n)


@pytest.fixture
def files_dir(tmp_path: Path) -> Path:
    for name, text in JSON_FILES.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def run(text: str, ctx: Ctx, folder: Path):
    return validate_text(text, context=ctx(folder) if ctx else None)


# --- each rule tripped: (code, yaml, key, (line, column), context) ----------------------------------

TRIPS = [
    pytest.param("TSP101", "minWorkers: 1\nhandler: [1,\nmaxWorkers: 2\n", "<file>", (4, 1), None, id="101-flow"),
    pytest.param("TSP101", "minWorkers: 1\n  maxWorkers: 2\n", "<file>", (2, 13), None, id="101-indent"),
    pytest.param("TSP101", "minWorkers: 1\n\tmaxWorkers: 1\n", "<file>", (2, 1), None, id="101-tab"),
    pytest.param("TSP102", "", "<file>", (1, 1), None, id="102-empty"),
    pytest.param("TSP102", "  \n\n", "<file>", (1, 1), None, id="102-blank"),
    pytest.param("TSP102", "# minWorkers: 1\n# maxWorkers: 1\n", "<file>", (1, 1), None, id="102-comments"),
    pytest.param("TSP103", "- minWorkers: 1\n", "<file>", (1, 1), None, id="103-list"),
    pytest.param("TSP103", "minWorkers 1\n", "<file>", (1, 1), None, id="103-scalar"),
    pytest.param("TSP104", "minWorkers: 1\nmaxWorkers: 1\nminWorkers: 1\n", "minWorkers", (3, 1), None, id="104"),
    pytest.param("TSP110", 'responseTimeout: "300"\n', "responseTimeout", (1, 1), None, id="110-quoted"),
    pytest.param("TSP110", 'minWorkers: 1\ndeviceIds: [0, "1"]\n', "deviceIds[1]", (2, 16), None, id="110-ids"),
    pytest.param("TSP110", 'asyncCommunication: "true"\n', "asyncCommunication", (1, 1), None, id="110-bool"),
    pytest.param("TSP110", "minWorkers: true\n", "minWorkers", (1, 1), None, id="110-bool-int"),
    pytest.param("TSP110", 'parallelType: tp\ntorchrun:\n  nproc-per-node: "2"\n', "torchrun.nproc-per-node",
                 (3, 3), None, id="110-nproc"),
    pytest.param("TSP111", "batchSize: 0\n", "batchSize", (1, 1), None, id="111-batch"),
    pytest.param("TSP111", "parallelType: tp\nparallelLevel: 0\n", "parallelLevel", (2, 1), None, id="111-level"),
    pytest.param("TSP111", "parallelType: pp\ntorchrun:\n  nproc-per-node: 2\npippy:\n  chunks: 0\n", "pippy.chunks",
                 (5, 3), None, id="111-chunks"),
    pytest.param("TSP112", "paralleltype: tp\n", "paralleltype", (1, 1), None, id="112-paralleltype"),
    pytest.param("TSP112", "minWorkers: 1\ndeviceID: [0]\n", "deviceID", (2, 1), None, id="112-deviceID"),
    pytest.param("TSP112", "maxworkers: 1\n", "maxworkers", (1, 1), None, id="112-case"),
    pytest.param("TSP112", "handler:\n  modelpath: m\n", "handler.modelpath", (2, 3), None, id="112-handler"),
    pytest.param("TSP113", TP2.replace("nproc-per-node", "nproc_per_node"), "torchrun.nproc_per_node", (3, 3), None,
                 id="113-nproc_per_node"),
    pytest.param("TSP113", TP2 + "  max-restarts: 3\n", "torchrun.max-restarts", (4, 3), None, id="113-unread"),
    pytest.param("TSP114", "parallelType: 5\n", "parallelType", (1, 1), None, id="114-int"),
    pytest.param("TSP114", "minWorkers: 1\nparallelType: dp\n", "parallelType", (2, 1), None, id="114-dp"),
    pytest.param("TSP114", "deviceType: tpu\n", "deviceType", (1, 1), None, id="114-device"),
    pytest.param("TSP114", "parallelType: custom\nhandler:\n  device_map: everywhere\n", "handler.device_map", (3, 3),
                 None, id="114-device_map"),
    pytest.param("TSP114", "parallelType: custom\nhandler:\n  device_map: [0, 1]\n", "handler.device_map", (3, 3),
                 None, id="114-device_map-list"),
    pytest.param("TSP201", "parallelType: tp\nparallelLevel: 2\ntorchrun:\n  nproc-per-node: 2\n", "parallelLevel",
                 (2, 1), None, id="201-equal"),
    pytest.param("TSP201", TP2 + "parallelLevel: 4\n", "parallelLevel", (4, 1), None, id="201-after"),
    pytest.param("TSP202", "parallelType: pp\nparallelLevel: 2\n", "parallelLevel", (2, 1), None, id="202-pp"),
    pytest.param("TSP202", "parallelType: pptp\nparallelLevel: 4\npippy:\n  pp_size: 2\n", "parallelLevel", (2, 1),
                 None, id="202-pptp"),
    pytest.param("TSP203", "parallelType: tp\nparallelLevel: 2\ntorchrun:\n  OMP_NUMBER_THREADS: 2\n", "torchrun",
                 (3, 1), None, id="203"),
    pytest.param("TSP204", "parallelType: custom\nparallelLevel: 2\n", "parallelLevel", (2, 1), None, id="204"),
    pytest.param("TSP204", "parallelType: custom\nparallelLevel: 2\nasyncCommunication: false\n", "parallelLevel",
                 (2, 1), None, id="204-false"),
    pytest.param("TSP205", "parallelType: custom\ntorchrun:\n  nproc-per-node: 2\n", "torchrun", (2, 1), None, id="205"),
    pytest.param("TSP205", "parallelType: custom\nasyncCommunication: true\ntorchrun:\n  nproc-per-node: 1\n",
                 "torchrun", (3, 1), None, id="205-async"),
    pytest.param("TSP206", "minWorkers: 1\nparallelLevel: 2\n", "parallelLevel", (2, 1), None, id="206-level"),
    pytest.param("TSP206", "torchrun:\n  nproc-per-node: 2\n", "torchrun", (1, 1), None, id="206-torchrun"),
    pytest.param("TSP207", TP2 + "  nnodes: 2\n", "torchrun.nnodes", (4, 3), None, id="207"),
    pytest.param("TSP221", TP2 + "  nnodes: 2\n  rdzv-endpoint: 10.0.0.1:29411\n", "torchrun.nnodes", (4, 3), None,
                 id="221-tp-static"),
    pytest.param("TSP222", TP2 + "  node-rank: 0\n", "torchrun.node-rank", (4, 3), None, id="222-node-rank"),
    pytest.param("TSP222", TP2 + "  rdzv-conf: join_timeout=60\n", "torchrun.rdzv-conf", (4, 3), None, id="222-conf"),
    pytest.param("TSP223", PP_ACROSS, "torchrun.nnodes", (4, 3), None, id="223"),
    pytest.param("TSP224", "maxWorkers: 2\n" + PP_ACROSS, "maxWorkers", (1, 1), None, id="224"),
    pytest.param("TSP223", "startupTimeout: 200\n" + PP_ACROSS, "startupTimeout", (1, 1), None, id="223-set"),
    pytest.param("TSP228", PP_ACROSS, "torchrun.nnodes", (4, 3), None, id="228-default"),
    pytest.param("TSP228", PP_ACROSS + "  rdzv-backend: c10d\n", "torchrun.rdzv-backend", (6, 3), None, id="228-set"),
    pytest.param("TSP208", PPTP4, "parallelType", (1, 1), None, id="208-no-pippy"),
    pytest.param("TSP208", PPTP4 + "pippy:\n  chunks: 1\n", "pippy", (4, 1), None, id="208-pippy"),
    pytest.param("TSP209", PPTP4 + "pippy:\n  pp_size: 3\n", "pippy.pp_size", (5, 3), None, id="209"),
    pytest.param("TSP211", "parallelType: custom\nparallelLevel: 2\nasyncCommunication: true\nbatchSize: 4\n",
                 "batchSize", (4, 1), None, id="211"),
    pytest.param("TSP210", "parallelType: pp\n", "parallelType", (1, 1), None, id="210-pp"),
    pytest.param("TSP210", TP2.replace("2", "1"), "torchrun", (2, 1), None, id="210-tp-nproc1"),
    pytest.param("TSP212", TP2, "torchrun", (2, 1), None, id="212-unset"),
    pytest.param("TSP212", TP2 + "  rdzv-endpoint: localhost:29400\n", "torchrun.rdzv-endpoint", (4, 3), None,
                 id="212-default-port"),
    pytest.param("TSP212", "parallelType: pp\ntorchrun:\n  nproc-per-node: 2\n  rdzv-endpoint: 127.0.0.1\n",
                 "torchrun.rdzv-endpoint", (4, 3), None, id="212-no-port"),
    pytest.param("TSP301", "deviceIds: [0, 0]\n", "deviceIds[1]", (1, 16), None, id="301"),
    pytest.param("TSP301", "deviceIds:\n  - 1\n  - 2\n  - 1\n", "deviceIds[2]", (4, 5), None, id="301-block"),
    pytest.param("TSP302", "deviceIds: [0, -1]\n", "deviceIds[1]", (1, 16), None, id="302"),
    pytest.param("TSP303", TP2.replace("2", "4") + "deviceIds: [0, 1]\n", "deviceIds", (4, 1), None, id="303"),
    pytest.param("TSP304", TP2 + "deviceIds: [0, 1, 2]\n", "deviceIds", (4, 1), None, id="304"),
    pytest.param("TSP305", "deviceType: cpu\ndeviceIds: [0]\n", "deviceIds", (2, 1), None, id="305"),
    pytest.param("TSP306", "deviceType: gpu\ndeviceIds: [0, 3]\n", "deviceIds[1]", (2, 16), gpus(2), id="306-id"),
    pytest.param("TSP306", "deviceType: gpu\n" + TP2.replace("2", "4"), "torchrun.nproc-per-node", (4, 3), gpus(2),
                 id="306-nproc"),
    pytest.param("TSP306", "deviceType: gpu\nparallelType: custom\nparallelLevel: 4\nasyncCommunication: true\n",
                 "parallelLevel", (3, 1), gpus(2), id="306-custom"),
    pytest.param("TSP401", "minWorkers: 2\nmaxWorkers: 1\n", "minWorkers", (1, 1), None, id="401"),
    pytest.param("TSP402", "minWorkers: 0\n", "minWorkers", (1, 1), None, id="402"),
    pytest.param("TSP501", "parallelType: pp\ntorchrun:\n  nproc-per-node: 2\ndeepspeed:\n  dtype: fp16\n",
                 "deepspeed", (4, 1), None, id="501-deepspeed-pp"),
    pytest.param("TSP501", TP2 + "pippy:\n  chunks: 1\n", "pippy", (4, 1), None, id="501-pippy-tp"),
    pytest.param("TSP501", "parallelType: custom\npippy:\n  chunks: 1\n", "pippy", (2, 1), None, id="501-pippy-custom"),
    pytest.param("TSP501", TP2 + "handler:\n  device_map: auto\n", "handler.device_map", (5, 3), None,
                 id="501-device_map-tp"),
    pytest.param("TSP501", PPTP4 + "pippy:\n  pp_size: 2\nhandler:\n  device_map: {lm_head: 0}\n",
                 "handler.device_map", (7, 3), None, id="501-device_map-pptp"),
    pytest.param("TSP502", "parallelType: pp\ntorchrun:\n  nproc-per-node: 2\npippy:\n  chunks: 4\n", "pippy.chunks",
                 (5, 3), None, id="502"),
    pytest.param("TSP504", "parallelType: pp\ntorchrun:\n  nproc-per-node: 2\nbatchSize: 4\npippy:\n  chunks: 4\n",
                 "pippy.chunks", (6, 3), None, id="504"),
    pytest.param("TSP503", "parallelType: custom\nhandler:\n  max_memory: {gpu0: 10GiB}\n", "handler.max_memory.gpu0",
                 (3, 16), None, id="503"),
    pytest.param("TSP601", TP2 + "deepspeed:\n  config: /etc/ds-config.json\n", "deepspeed.config", (5, 3), None,
                 id="601-config"),
    pytest.param("TSP601", TP2 + "handler:\n  offload_folder: /var/offload\n", "handler.offload_folder", (5, 3), None,
                 id="601-offload"),
    pytest.param("TSP602", TP2 + "deepspeed:\n  config: ../ds-tp2.json\n", "deepspeed.config", (5, 3), beside,
                 id="602-config"),
    pytest.param("TSP602", TP2 + "deepspeed:\n  checkpoint: a/../../ck.json\n", "deepspeed.checkpoint", (5, 3), None,
                 id="602-checkpoint"),
    pytest.param("TSP602", TP2 + "handler:\n  model_path: ../model\n", "handler.model_path", (5, 3), None,
                 id="602-model_path"),
    pytest.param("TSP603", TP2 + "deepspeed:\n  config: ds-config.json\n", "deepspeed.config", (5, 3),
                 archive(**{"other.json": "ds-tp2.json"}), id="603-config"),
    pytest.param("TSP603", TP2 + "deepspeed:\n  checkpoint: checkpoints.json\n", "deepspeed.checkpoint", (5, 3),
                 archive(), id="603-checkpoint"),
    pytest.param("TSP604", TP2 + "deepspeed:\n  config: ds-config.json\n", "deepspeed.config", (5, 3),
                 archive(**{"ds-config.json": "not-json.json"}), id="604-archive"),
    pytest.param("TSP604", TP2 + "deepspeed:\n  config: not-json.json\n", "deepspeed.config", (5, 3), beside,
                 id="604-beside"),
    pytest.param("TSP605", TP2 + "deepspeed:\n  config: ds-config.json\n", "deepspeed.config", (5, 3),
                 archive(**{"ds-config.json": "ds-tp4.json"}), id="605-json-tp_size"),
    pytest.param("TSP605", TP2 + "deepspeed:\n  config: ds-mp3.json\n", "deepspeed.config", (5, 3), beside,
                 id="605-json-mp_size"),
    pytest.param("TSP605", TP2 + "deepspeed:\n  tensor_parallel: {tp_size: 4}\n", "deepspeed.tensor_parallel.tp_size",
                 (5, 21), None, id="605-inline-tp_size"),
    pytest.param("TSP605", TP2 + "deepspeed:\n  mp_size: 1\n", "deepspeed.mp_size", (5, 3), None, id="605-mp_size"),
    pytest.param("TSP605", PPTP4 + "pippy:\n  pp_size: 2\ndeepspeed:\n  tensor_parallel:\n    tp_size: 4\n",
                 "deepspeed.tensor_parallel.tp_size", (8, 5), None, id="605-pptp"),
    pytest.param("TSP606", "handler:\n  model_path: /nonexistent/ts-plugin-test/model\n", "handler.model_path", (2, 3),
                 None, id="606"),
    pytest.param("TSP607", "handler:\n  trust_remote_code: true\n", "handler.trust_remote_code", (2, 3), None, id="607"),
    pytest.param("TSP608", "deviceType: gpu\n", "deviceType", (1, 1), gpus(0), id="608"),
    pytest.param("TSP609", TP2 + "deepspeed:\n  config: ds-config.json\n", "deepspeed.config", (5, 3), beside,
                 id="609"),
    pytest.param("TSP610", PPTP4 + "pippy:\n  pp_size: 2\n", "torchrun.nproc-per-node", (3, 3),
                 archive(**{"config.json": "heads9.json"}), id="610"),
    pytest.param("TSP611", TP2 + "deepspeed:\n  checkpoint: ck.json\n", "deepspeed.checkpoint", (5, 3),
                 archive(**{"ck.json": "ck.json"}), id="611"),
    pytest.param("TSP505", PPTP4 + "pippy:\n  pp_size: 2\n  chunks: 2\n", "pippy.chunks", (6, 3), None, id="505"),
    pytest.param("TSP213", "continuousBatching: true\nbatchSize: 4\nasyncCommunication: true\n", "asyncCommunication",
                 (3, 1), None, id="213"),
    pytest.param("TSP214", "continuousBatching: true\nbatchSize: 4\nsequenceBatching: true\n", "sequenceBatching",
                 (3, 1), None, id="214"),
    pytest.param("TSP215", "continuousBatching: true\nbatchSize: 1\n", "batchSize", (2, 1), None, id="215"),
    pytest.param("TSP217", "minWorkers: 1\nbatchSize: 4\n", "batchSize", (2, 1), None, id="217"),
    pytest.param("TSP218", "handler:\n  steps_per_call: 4\n", "handler.steps_per_call", (2, 3), None, id="218"),
    pytest.param("TSP220", "handler:\n  max_num_batched_tokens: null\n", "handler.max_num_batched_tokens", (2, 3),
                 None, id="220"),
    pytest.param("TSP225", "handler:\n  compile_step: true\n", "handler.compile_step", (2, 3), None, id="225"),
    pytest.param("TSP226", TP2.replace("tp", "pp") + "startupTimeout: 600\nhandler:\n  compile_step: true\n",
                 "handler.compile_step", (6, 3), None, id="226"),
    pytest.param("TSP227", "parallelType: pp\ndeviceType: cpu\ntorchrun:\n  nproc-per-node: 2\n" + OWN_RDZV
                 + "  OMP_NUMBER_THREADS: 2\nbatchSize: 8\npippy:\n  chunks: 2\n", "pippy.chunks", (9, 3), None, id="227"),
    pytest.param("TSP227", "parallelType: pp\ndeviceType: cpu\ntorchrun:\n  nproc-per-node: 2\n" + OWN_RDZV,
                 "torchrun.OMP_NUMBER_THREADS", (3, 1), None, id="227-one-thread"),
]

# --- near configs that must not trip the code: (code, yaml, context) -------------------------------

NEAR = [
    pytest.param("TSP101", "minWorkers: 1\nhandler: [1]\nmaxWorkers: 2\n", None, id="101"),
    pytest.param("TSP102", "# a comment\nminWorkers: 1\n", None, id="102"),
    pytest.param("TSP103", "minWorkers: 1\n", None, id="103"),
    pytest.param("TSP104", "minWorkers: 1\nhandler:\n  minWorkers: 1\n", None, id="104-other-section"),
    pytest.param("TSP110", "responseTimeout: 300\ndeviceIds: [0, 1]\nasyncCommunication: true\n", None, id="110"),
    pytest.param("TSP111", "batchSize: 1\nparallelType: custom\nparallelLevel: 1\n", None, id="111"),
    pytest.param("TSP112", "myHandlerSettings:\n  foo: 1\ngeneration: {temperature: 0.7}\n", None, id="112"),
    pytest.param("TSP113", TP2 + "  OMP_NUMBER_THREADS: 2\n  rdzv-endpoint: localhost:29501\n", None, id="113"),
    pytest.param("TSP114", TP2.replace("tp", '"TP"') + "deviceType: GPU\n", None, id="114-case-insensitive"),
    pytest.param("TSP114", "parallelType: custom\nhandler:\n  device_map: {model.embed: 0, lm_head: cpu}\n", None,
                 id="114-device_map-dict"),
    pytest.param("TSP201", TP2, None, id="201"),
    pytest.param("TSP202", TP2, None, id="202"),
    pytest.param("TSP202", "parallelType: custom\nparallelLevel: 2\nasyncCommunication: true\n", None, id="202-custom"),
    pytest.param("TSP203", TP2 + "  OMP_NUMBER_THREADS: 2\n", None, id="203"),
    pytest.param("TSP204", "parallelType: custom\nparallelLevel: 2\nasyncCommunication: true\n", None, id="204"),
    pytest.param("TSP204", "parallelType: custom\nparallelLevel: 1\n", None, id="204-level1"),
    pytest.param("TSP205", "parallelType: custom\nparallelLevel: 2\nasyncCommunication: true\n", None, id="205"),
    pytest.param("TSP206", TP2, None, id="206"),
    pytest.param("TSP207", TP2 + "  nnodes: 1\n", None, id="207"),
    pytest.param("TSP207", PP_ACROSS, None, id="207-endpoint"),
    pytest.param("TSP221", "continuousBatching: true\nbatchSize: 8\n" + TP2 + "  nnodes: 2\n  rdzv-endpoint: h:29411\n",
                 None, id="221-continuous"),
    pytest.param("TSP221", PP_ACROSS, None, id="221-pp-static"),
    pytest.param("TSP222", TP2 + OWN_RDZV, None, id="222"),
    pytest.param("TSP223", "startupTimeout: 300\n" + PP_ACROSS, None, id="223"),
    pytest.param("TSP228", PP_ACROSS + "  rdzv-backend: ts-plugin\n", None, id="228"),
    pytest.param("TSP228", TP2 + "  rdzv-backend: c10d\n" + OWN_RDZV, None, id="228-one-node"),
    pytest.param("TSP224", "maxWorkers: 2\n" + TP2 + OWN_RDZV, None, id="224-one-node"),
    pytest.param("TSP208", PPTP4 + "pippy:\n  pp_size: 2\n", None, id="208"),
    pytest.param("TSP209", PPTP4 + "pippy:\n  pp_size: 4\n", None, id="209"),
    pytest.param("TSP210", TP2, None, id="210"),
    pytest.param("TSP212", TP2 + OWN_RDZV, None, id="212"),
    pytest.param("TSP212", "parallelType: pptp\ntorchrun:\n  nproc-per-node: 4\n  rdzv-endpoint: '[::1]:29502'\n"
                 "pippy:\n  pp_size: 2\n", None, id="212-ipv6"),
    pytest.param("TSP212", "parallelType: custom\nparallelLevel: 2\nasyncCommunication: true\n", None,
                 id="212-custom-no-torchrun"),
    pytest.param("TSP211", "parallelType: custom\nparallelLevel: 2\nasyncCommunication: true\nbatchSize: 1\n", None,
                 id="211"),
    pytest.param("TSP301", "deviceIds: [0, 1]\n", None, id="301"),
    pytest.param("TSP302", "deviceIds: [0, 1]\n", None, id="302"),
    pytest.param("TSP303", TP2.replace("2", "4") + "deviceIds: [0, 1, 2, 3]\n", None, id="303"),
    pytest.param("TSP304", TP2 + "deviceIds: [0, 1, 2, 3]\n", None, id="304"),
    pytest.param("TSP305", "deviceType: gpu\ndeviceIds: [0]\n", None, id="305"),
    pytest.param("TSP306", "deviceType: gpu\ndeviceIds: [0, 3]\n", gpus(4), id="306-id"),
    pytest.param("TSP306", "deviceType: gpu\n" + TP2, gpus(2), id="306-nproc"),
    pytest.param("TSP306", "deviceType: gpu\ndeviceIds: [0, 3]\n", None, id="306-unknown-host"),
    pytest.param("TSP401", "minWorkers: 1\nmaxWorkers: 2\n", None, id="401"),
    pytest.param("TSP402", "minWorkers: 1\n", None, id="402"),
    pytest.param("TSP501", TP2 + "deepspeed:\n  dtype: fp16\n", None, id="501-deepspeed-tp"),
    pytest.param("TSP501", "parallelType: pp\ntorchrun:\n  nproc-per-node: 2\npippy:\n  chunks: 1\n", None,
                 id="501-pippy-pp"),
    pytest.param("TSP501", "parallelType: custom\nhandler:\n  device_map: auto\n", None, id="501-device_map-custom"),
    pytest.param("TSP502", "parallelType: pp\ntorchrun:\n  nproc-per-node: 2\nbatchSize: 4\npippy:\n  chunks: 4\n",
                 None, id="502"),
    pytest.param("TSP504", "parallelType: pp\ntorchrun:\n  nproc-per-node: 2\nbatchSize: 4\npippy:\n  chunks: 2\n",
                 None, id="504"),
    pytest.param("TSP503", "parallelType: custom\nhandler:\n  max_memory: {'cuda:1': 5GiB, cpu: 30GiB}\n", None,
                 id="503-cuda-n"),  # the Accelerate engine reads it as GPU 1: the rule must not refuse it
    pytest.param("TSP503", "parallelType: custom\nhandler:\n  max_memory: {0: 10GiB, '1': 5GiB, cpu: 30GiB, disk: 1TiB}\n",
                 None, id="503"),
    pytest.param("TSP601", TP2 + "deepspeed:\n  config: ds-tp2.json\n", beside, id="601"),
    pytest.param("TSP602", TP2 + "deepspeed:\n  config: ./sub/../ds-tp2.json\n", beside, id="602"),
    pytest.param("TSP602", TP2 + "handler:\n  model_path: /opt/models/../models/llama\n", None, id="602-absolute"),
    pytest.param("TSP603", TP2 + "deepspeed:\n  config: ds-config.json\n", archive(**{"ds-config.json": "ds-tp2.json"}),
                 id="603"),
    pytest.param("TSP603", TP2 + "deepspeed:\n  config: ds-config.json\n", beside, id="603-unknown-archive"),
    pytest.param("TSP604", TP2 + "deepspeed:\n  config: ds-config.json\n", archive(**{"ds-config.json": "ds-tp2.json"}),
                 id="604"),
    pytest.param("TSP605", TP2 + "deepspeed:\n  config: ds-config.json\n", archive(**{"ds-config.json": "ds-tp2.json"}),
                 id="605-json"),
    pytest.param("TSP605", TP2 + "deepspeed:\n  tensor_parallel: {tp_size: 2}\n  mp_size: 2\n", None, id="605-inline"),
    pytest.param("TSP605", PPTP4 + "pippy:\n  pp_size: 2\ndeepspeed:\n  tensor_parallel: {tp_size: 2}\n", None,
                 id="605-pptp"),
    pytest.param("TSP606", "handler:\n  model_path: model\n", None, id="606-relative"),
    pytest.param("TSP606", "handler:\n  model_path: {here}\n", None, id="606-absolute-exists"),
    pytest.param("TSP607", "handler:\n  trust_remote_code: false\n", None, id="607"),
    pytest.param("TSP608", "deviceType: gpu\n", gpus(1), id="608"),
    pytest.param("TSP608", "deviceType: gpu\n", None, id="608-unknown-host"),
    pytest.param("TSP609", TP2 + "deepspeed:\n  config: ds-tp2.json\n", beside, id="609"),
    pytest.param("TSP609", TP2 + "deepspeed:\n  config: ds-config.json\n", archive(**{"ds-config.json": "ds-tp2.json"}),
                 id="609-archive-known"),
    pytest.param("TSP610", PPTP4 + "pippy:\n  pp_size: 2\n", archive(**{"config.json": "heads8.json"}), id="610"),
    pytest.param("TSP610", PPTP4 + "pippy:\n  pp_size: 4\n", archive(**{"config.json": "heads9.json"}),
                 id="610-tp1"),
    pytest.param("TSP611", TP2 + "deepspeed:\n  config: ds-config.json\n", archive(**{"ds-config.json": "ds-tp2.json"}),
                 id="611"),
    pytest.param("TSP505", PPTP4 + "pippy:\n  pp_size: 2\n  chunks: 1\n", None, id="505"),
    pytest.param("TSP213", "asyncCommunication: true\nbatchSize: 1\n", None, id="213"),
    pytest.param("TSP214", "sequenceBatching: true\n", None, id="214"),
    pytest.param("TSP215", "continuousBatching: true\nbatchSize: 2\n", None, id="215"),
    pytest.param("TSP217", "batchSize: 4\ncontinuousBatching: false\n", None, id="217-static-chosen"),
    pytest.param("TSP217", "batchSize: 4\nasyncCommunication: true\n", None, id="217-async"),
    pytest.param("TSP218", "continuousBatching: true\nbatchSize: 4\nhandler:\n  steps_per_call: 4\n", None, id="218"),
    pytest.param("TSP220", "handler:\n  max_num_batched_tokens: 4096\n", None, id="220"),
    pytest.param("TSP225", "startupTimeout: 300\nhandler:\n  compile_step: true\n", None, id="225"),
    pytest.param("TSP226", TP2 + "startupTimeout: 600\nhandler:\n  compile_step: true\n", None, id="226-tp"),
    pytest.param("TSP227", "parallelType: pp\ndeviceType: cpu\ntorchrun:\n  nproc-per-node: 2\n" + OWN_RDZV
                 + "  OMP_NUMBER_THREADS: 2\npippy:\n  chunks: 1\n", None, id="227"),
    pytest.param("TSP227", "parallelType: pp\ndeviceType: gpu\ntorchrun:\n  nproc-per-node: 2\n" + OWN_RDZV
                 + "batchSize: 8\npippy:\n  chunks: 2\n", None, id="227-gpu"),
]


def _ids(params) -> set:
    return {p.values[0] for p in params}


def test_every_rule_has_a_trip_and_a_near_case():
    assert set(RULES) == _ids(TRIPS)
    assert set(RULES) == _ids(NEAR)


@pytest.mark.parametrize("code, text, key, position, ctx", TRIPS)
def test_rule_trips(code, text, key, position, ctx, files_dir):
    report = run(text, ctx, files_dir)
    hits = [f for f in report.findings if f.code == code]
    assert hits, report.text()
    assert [(f.key, (f.line, f.column)) for f in hits] == [(key, position)], report.text()
    finding = hits[0]
    assert finding.severity == RULES[code].severity
    assert finding.message.strip() and finding.hint.strip()
    assert report.ok == (not report.errors)
    if RULES[code].severity == "error":
        assert not report.ok


@pytest.mark.parametrize("code, text, ctx", NEAR)
def test_rule_near_miss_does_not_trip(code, text, ctx, files_dir):
    report = run(text.replace("{here}", str(files_dir)), ctx, files_dir)
    assert code not in [f.code for f in report.findings], report.text()


# --- messages name the offending values, hints name the fix -----------------------------------------

@pytest.mark.parametrize("text, code, in_message, in_hint", [
    ("paralleltype: tp\n", "TSP112", "paralleltype", "did you mean `parallelType`?"),
    ("deviceID: [0]\n", "TSP112", "deviceID", "did you mean `deviceIds`?"),
    (TP2.replace("nproc-per-node", "nproc_per_node"), "TSP113", "nproc_per_node", "did you mean `nproc-per-node`?"),
    (TP2 + "  max-restarts: 3\n", "TSP113", "max-restarts", "nproc-per-node"),
    ('responseTimeout: "300"\n', "TSP110", '"300"', "without quotes"),
    ('deviceIds: [0, "1"]\n', "TSP110", '"1"', "without quotes"),
    ("parallelType: 5\n", "TSP114", "5", "'pp', 'tp', 'pptp' or 'custom'"),
    ("deviceType: tpu\n", "TSP114", "tpu", "'cpu' or 'gpu'"),
    ("parallelType: tp\nparallelLevel: 3\ntorchrun:\n  nproc-per-node: 3\n", "TSP201", "parallelLevel 3",
     "torchrun: {nproc-per-node: 3}"),
    ("parallelType: tp\nparallelLevel: 2\ntorchrun:\n  OMP_NUMBER_THREADS: 2\n", "TSP203", "parallelLevel 2",
     "torchrun: {nproc-per-node: 2}"),
    ("parallelType: custom\nparallelLevel: 2\n", "TSP204", "parallelLevel 2", "asyncCommunication: true"),
    ("minWorkers: 3\nmaxWorkers: 2\n", "TSP401", "minWorkers 3 > maxWorkers 2", "minWorkers <= maxWorkers"),
    (PPTP4 + "pippy:\n  pp_size: 3\n", "TSP209", "pp_size 3", "divisor of 4"),
    ("deviceIds: [4, 5, 4]\n", "TSP301", "GPU 4", "once"),
    ("deviceIds: [-2]\n", "TSP302", "-2", "GPU ids"),
    (TP2 + "deepspeed:\n  tensor_parallel: {tp_size: 4}\n", "TSP605", "is 4", "set it to 2"),
])
def test_message_and_hint(text, code, in_message, in_hint):
    [finding] = [f for f in validate_text(text).findings if f.code == code]
    assert in_message in finding.message
    assert in_hint in finding.hint


# --- the documented examples (shared/parallel-type-config.txt) --------------------------------------

def _documented_example(title: str) -> str:
    """The YAML block that follows `title` in TorchServe's parallelType page."""
    doc = DOCUMENTED.read_text(encoding="utf-8")
    after = doc.split(title, 1)[1].lstrip("\n")
    block = after.split("\n\n", 1)[0] + "\n"
    assert "minWorkers: 1\n" in block, block
    return block


PP_DOC = "Pipeline parallelism with PiPPy on 4 GPUs:"
TP_DOC = "Tensor parallelism with DeepSpeed on 4 GPUs:"
LEVEL_DOC = "Alternative GPU specification using parallelLevel and deviceIds:"


@pytest.mark.parametrize("title", [PP_DOC, TP_DOC, "Configuration Schema (model-config.yaml):"])
def test_documented_torchrun_examples_pass(title, tmp_path):
    text = _documented_example(title)
    assert "torchrun:" in text
    report = validate_text(text)
    assert report.errors == [], report.text()
    # the only things that may be said: /path/to/model does not exist on this host, and the documented
    # torchrun section leaves the host-wide default rendezvous (TSP212)
    assert {f.code for f in report.findings} <= {"TSP606", "TSP212"}
    # also as a file next to which ds-config.json does not exist (archive contents unknown)
    path = tmp_path / "model-config.yaml"
    path.write_text(text, encoding="utf-8")
    assert validate_file(path).errors == []


def test_documented_examples_layout():
    pp = validate_text(_documented_example(PP_DOC)).layout
    tp = validate_text(_documented_example(TP_DOC)).layout
    assert (pp.parallel_type, pp.world_size, pp.pp_size, pp.tp_size) == ("pp", 4, 4, 1)
    assert (tp.parallel_type, tp.world_size, tp.pp_size, tp.tp_size) == ("tp", 4, 1, 4)


def test_documented_parallel_level_example_is_rejected():
    text = _documented_example(LEVEL_DOC)
    assert "parallelLevel: 4" in text and "deviceIds: [2, 3, 4, 5]" in text and "torchrun" not in text
    report = validate_text(text)
    assert [(f.code, f.key, f.line, f.column) for f in report.findings] == [("TSP202", "parallelLevel", 5, 1)]
    assert "torchrun: {nproc-per-node: 4}" in report.findings[0].hint
    fixed = text.replace("parallelLevel: 4 ", "torchrun: {nproc-per-node: 4, rdzv-endpoint: localhost:29501}")
    assert validate_text(fixed).findings == []


# --- no false errors ---------------------------------------------------------------------------------

ANCHORS = """\
# shared defaults
x-defaults: &workers
  minWorkers: 1   # one worker: the model takes every GPU
  maxWorkers: 1
x-ids: &ids [0, 1]
<<: *workers
parallelType: tp  # DeepSpeed
deviceType: gpu
deviceIds: *ids
torchrun: &tr
  nproc-per-node: 2
  rdzv-endpoint: localhost:29501
deepspeed:
  tensor_parallel: {tp_size: 2}
handler:
  <<: {max_new_tokens: 32, dtype: bf16}
  model_path: model   # relative: inside the model folder
"""


def test_anchors_aliases_merge_keys_and_comments_pass():
    report = validate_text(ANCHORS)
    assert report.findings == [], report.text()
    assert report.config.min_workers == 1 and report.config.device_ids == [0, 1]
    assert report.config.handler.max_new_tokens == 32 and report.layout.world_size == 2


def test_finding_inside_a_merged_anchor_points_into_the_file():
    text = "x-w: &w\n  minWorkers: 3\n  maxWorkers: 2\n<<: *w\n"
    [finding] = validate_text(text).findings
    assert (finding.code, finding.key) == ("TSP401", "minWorkers")
    assert 1 <= finding.line <= 4


@pytest.mark.parametrize("section", ["generation", "tokenizer", "metrics", "logging", "engine", "quantization",
                                     "lora", "model", "x-defaults", "vllm_engine_config", "micro_batching"])
def test_unknown_sections_that_are_not_near_misses_pass(section):
    report = validate_text(f"minWorkers: 1\n{section}:\n  foo: 1\n  bar: [1, 2]\n")
    assert report.findings == [], report.text()


def test_unknown_keys_inside_free_form_sections_pass():
    text = (TP2 + OWN_RDZV + "deepspeed:\n  injection_policy: {LlamaDecoderLayer: [o_proj]}\n  my_option: 1\n"
            "handler:\n  model_path: model\n  my_prompt_template: '{x}'\n")
    assert validate_text(text).findings == []


@pytest.mark.parametrize("model_path", ["model", "models/llama-7b", "./weights"])
def test_relative_model_path_need_not_exist(model_path, tmp_path):
    path = tmp_path / "model-config.yaml"
    path.write_text(f"{TP2}{OWN_RDZV}handler:\n  model_path: {model_path}\n", encoding="utf-8")
    assert validate_file(path).findings == []
    assert validate_file(path, ValidationContext(archive_files={})).findings == []


def test_warnings_only_is_ok():
    report = validate_text("minWorkers: 0\nparallelType: pp\n")
    assert {f.code for f in report.findings} == {"TSP402", "TSP210"}
    assert report.ok and report.errors == []


def test_findings_are_sorted_by_position():
    text = "minWorkers: 0\ndeviceIds: [1, 1]\nparallelType: custom\nparallelLevel: 2\n"
    report = validate_text(text)
    positions = [(f.line, f.column) for f in report.findings]
    assert positions == sorted(positions) and len(positions) == 3


def test_validate_file_looks_beside_the_config(files_dir):
    path = files_dir / "model-config.yaml"
    path.write_text(TP2 + OWN_RDZV + "deepspeed:\n  config: ds-tp4.json\n", encoding="utf-8")
    assert [f.code for f in validate_file(path).findings] == ["TSP605"]
    path.write_text(TP2 + OWN_RDZV + "deepspeed:\n  config: ds-tp2.json\n", encoding="utf-8")
    assert validate_file(path).findings == []


def test_validate_alone_finds_files_in_the_model_folder_beside_the_config(files_dir):
    (files_dir / "model").mkdir()
    (files_dir / "model" / "ds-config.json").write_text(JSON_FILES["ds-tp4.json"], encoding="utf-8")
    (files_dir / "model" / "config.json").write_text(JSON_FILES["heads9.json"], encoding="utf-8")
    path = files_dir / "model-config.yaml"
    path.write_text(PPTP4 + OWN_RDZV + "pippy:\n  pp_size: 2\nhandler:\n  model_path: model\n", encoding="utf-8")
    report = validate_file(path)
    assert [f.code for f in report.findings] == ["TSP610"], report.text()
    assert "9 attention heads and 3 key/value heads" in report.findings[0].message
    assert "tp sizes that work: 1, 3" in report.findings[0].message
    path.write_text(TP2 + OWN_RDZV + "deepspeed:\n  config: ds-config.json\nhandler:\n  model_path: model\n",
                    encoding="utf-8")
    assert [f.code for f in validate_file(path).findings] == ["TSP605"]  # found in the model folder, and read


def test_model_dir_context_reports_missing_files(tmp_path):
    (tmp_path / "ds-config.json").write_text('{"tensor_parallel": {"tp_size": 2}}', encoding="utf-8")
    text = TP2 + OWN_RDZV + "deepspeed:\n  config: ds-config.json\n  checkpoint: checkpoints.json\n"
    report = validate_text(text, context=ValidationContext(model_dir=tmp_path))
    assert [(f.code, f.key) for f in report.findings] == [("TSP603", "deepspeed.checkpoint")]


# --- golden text -------------------------------------------------------------------------------------

GOLDEN = [
    pytest.param(
        "minWorkers: 1\nmaxWorkers: 1\nparallelType: \"tp\"\ndeviceType: \"gpu\"\n"
        "parallelLevel: 4        # Number of GPUs (mutually exclusive with nproc-per-node)\n"
        "deviceIds: [2, 3, 4, 5] # Explicit GPU IDs (optional)\n",
        "model-config.yaml:5:1: error TSP202 [parallelLevel] parallelType tp with parallelLevel 4 but no torchrun "
        "section: the frontend never reaches READY\n"
        "    hint: replace `parallelLevel: 4` with `torchrun: {nproc-per-node: 4}`",
        id="documented-parallelLevel"),
    pytest.param(
        "parallelType: tp\nparallelLevel: 2\ntorchrun:\n  nproc-per-node: 2\ndeviceIds: [0, 0]\nminWorkers: 0\n",
        "model-config.yaml:2:1: error TSP201 [parallelLevel] parallelLevel 2 and torchrun.nproc-per-node 2 are both "
        "set; they are mutually exclusive\n"
        "    hint: remove `parallelLevel` and keep `torchrun: {nproc-per-node: 2}`\n"
        "model-config.yaml:3:1: warning TSP212 [torchrun] torchrun.rdzv-endpoint is not set, so this model's "
        "torchrun shares the c10d store on port 29400 with every torchrun on the host; whichever started first "
        "hosts it, and when that worker restarts (a rank dies, the model is unloaded) every other model sharing "
        "it restarts too\n"
        "    hint: give each model its own: `torchrun: {rdzv-endpoint: localhost:<port>}` with a free port that no "
        "other model or server on this host uses\n"
        "model-config.yaml:5:16: error TSP301 [deviceIds[1]] GPU 0 appears twice in deviceIds [0, 0]\n"
        "    hint: list each GPU once\n"
        "model-config.yaml:6:1: warning TSP402 [minWorkers] minWorkers 0 becomes 1 in the frontend\n"
        "    hint: set `minWorkers: 1`",
        id="three-findings"),
    pytest.param(
        "paralleltype: tp\ntorchrun:\n  nproc_per_node: 2\n",
        "model-config.yaml:1:1: error TSP112 [paralleltype] unknown key `paralleltype` would be ignored\n"
        "    hint: did you mean `parallelType`?\n"
        "model-config.yaml:2:1: error TSP206 [torchrun] `torchrun` is set but parallelType is not, so TorchServe "
        "ignores it\n"
        "    hint: add `parallelType: pp|tp|pptp|custom`, or remove it\n"
        "model-config.yaml:3:3: error TSP113 [torchrun.nproc_per_node] torchrun key `nproc_per_node` is not read by "
        "TorchServe 0.12 and would be ignored\n"
        "    hint: did you mean `nproc-per-node`?",
        id="near-misses"),
    pytest.param(
        "minWorkers: 1\nhandler: {model_path: m,\nmaxWorkers: 1\n",
        "model-config.yaml:4:1: error TSP101 [<file>] YAML syntax error: expected ',' or '}', but got '<stream end>' "
        "(while parsing a flow mapping at line 2)\n"
        "    hint: fix the YAML; TorchServe would log this and serve with all defaults",
        id="yaml-syntax"),
    pytest.param("minWorkers: 1\nmaxWorkers: 1\n", "", id="clean"),
]


@pytest.mark.parametrize("text, expected", GOLDEN)
def test_report_text_golden(text, expected):
    assert validate_text(text).text() == expected


# --- known bugs (ts_plugin is owned elsewhere; these document them) ---------------------------------

def test_near_miss_snake_case_value_is_not_used():
    # the frontend ignores `min_workers`, so it must not count as minWorkers 5 (> maxWorkers 1)
    report = validate_text("min_workers: 5\n")
    assert [f.code for f in report.findings] == ["TSP112"]


def test_ignored_torchrun_key_does_not_count_as_nproc():
    # `nproc_per_node` is ignored by the frontend: the section sets 1 process, beside parallelLevel 2
    report = validate_text("parallelType: tp\nparallelLevel: 2\ntorchrun:\n  nproc_per_node: 2\n")
    assert sorted(f.code for f in report.findings) == ["TSP113", "TSP203", "TSP210", "TSP212"]
    assert report.layout.world_size == 1


def test_int_mapping_key_position():
    [finding] = validate_text("handler:\n  max_memory:\n    -1: 10GiB\n").findings
    assert finding.code == "TSP503"
    assert (finding.line, finding.column) == (3, 5)


def test_empty_handler_section_is_not_an_error():
    report = validate_text("minWorkers: 1\nhandler:\n  # model_path: model\n")
    assert report.ok, report.text()


def test_overriding_a_merged_key_is_not_a_duplicate():
    report = validate_text("x-defaults: &d {minWorkers: 1, maxWorkers: 2}\n<<: *d\nminWorkers: 2\n")
    assert report.findings == [], report.text()


@pytest.mark.parametrize("section", ["x-workers", "workers", "myHandler"])
def test_section_names_that_merely_contain_a_key_pass(section):
    report = validate_text(f"minWorkers: 1\n{section}:\n  foo: 1\n")
    assert report.findings == [], report.text()


def test_the_worker_validates_the_parsed_config_with_the_archived_files_positions(tmp_path):
    from ts_plugin.handlers.base import check_worker_config
    from ts_plugin.testing import worker_context

    (tmp_path / "model-config.yaml").write_text("minWorkers: 1\nhandler:\n  max_new_tokens: \"16\"\n")
    parsed = {"minWorkers": 1, "handler": {"max_new_tokens": "16"}}  # what TorchServe hands the handler
    context = worker_context(tmp_path, parsed, config_file="model-config.yaml")
    report = check_worker_config(context, tmp_path, gpus=0)
    assert [(f.code, f.line, f.column) for f in report.errors] == [("TSP110", 3, 3)]
    assert parsed == {"minWorkers": 1, "handler": {"max_new_tokens": "16"}}  # not edited in place
    # without the file the same finding, at 1:1
    report = check_worker_config(worker_context(tmp_path, parsed), tmp_path, gpus=0)
    assert [(f.code, f.line, f.column) for f in report.errors] == [("TSP110", 1, 1)]
    # a file TorchServe could not parse (it then serves every default): the file's own syntax error
    (tmp_path / "model-config.yaml").write_text("minWorkers: [1\n")
    context = worker_context(tmp_path, {}, config_file="model-config.yaml")
    assert [f.code for f in check_worker_config(context, tmp_path, gpus=0).errors] == ["TSP101"]


def test_deepspeed_settings_come_from_the_file_the_validator_read(tmp_path):
    import torch

    from ts_plugin.config import validate_file
    from ts_plugin.engines.deepspeed import inference_config

    (tmp_path / "ds.json").write_text('{"max_out_tokens": 512, "tensor_parallel": {"tp_size": 2}}')
    path = tmp_path / "model-config.yaml"
    path.write_text("parallelType: tp\ntorchrun:\n  nproc-per-node: 2\n  rdzv-endpoint: localhost:29555\n"
                    "deepspeed:\n  config: ds.json\n  max_out_tokens: 256\n")
    report = validate_file(path)
    assert report.ok, report.text()
    (tmp_path / "ds.json").unlink()  # read once, by the validator: the engine does not open it again
    settings = inference_config(report.config, report.layout, report.deepspeed_file, tmp_path, torch.device("cpu"),
                                torch.float32)
    assert settings["max_out_tokens"] == 256  # the inline key wins over the file
    assert settings["tensor_parallel"] == {"tp_size": 2}
    assert report.deepspeed_file == {"max_out_tokens": 512, "tensor_parallel": {"tp_size": 2}}
