"""Validation rules for model-config.yaml: every finding has a stable code, a key, a line and a fix."""
from __future__ import annotations

import copy
import difflib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Literal, Optional, Tuple

from pydantic import ValidationError

from ._loader import LoadedYaml, YamlSyntaxError, load_yaml
from .layout import ParallelLayout
from .parallel_types import PARALLEL_TYPES, names, parallel_type
from .schema import SECTIONS, ModelConfig, TorchrunConfig, known_keys, parse_device

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Rule:
    code: str
    severity: Severity
    title: str


RULES: Dict[str, Rule] = {}


def _rule(code: str, severity: Severity, title: str) -> Rule:
    RULES[code] = Rule(code, severity, title)
    return RULES[code]


YAML_SYNTAX = _rule("TSP101", "error", "YAML syntax error (the frontend would run the model with all defaults)")
EMPTY_FILE = _rule("TSP102", "error", "empty file (the frontend's config parsing crashes)")
NOT_A_MAPPING = _rule("TSP103", "error", "the file is not a mapping of keys to values")
DUPLICATE_KEY = _rule("TSP104", "warning", "a key written twice (the later one wins silently)")
WRONG_TYPE = _rule("TSP110", "error", "a value of the wrong type (the frontend ignores it and keeps its default)")
OUT_OF_RANGE = _rule("TSP111", "error", "a number out of its allowed range")
NEAR_MISS_KEY = _rule("TSP112", "error", "an unknown key that looks like a known one (ignored by the frontend)")
IGNORED_TORCHRUN_KEY = _rule("TSP113", "error", "a torchrun sub-key the frontend does not read")
INVALID_CHOICE = _rule("TSP114", "error", "a value outside its closed set of choices")
LEVEL_AND_NPROC = _rule("TSP201", "error", "torchrun.nproc-per-node and parallelLevel both set (mutually exclusive)")
LEVEL_WITHOUT_TORCHRUN = _rule("TSP202", "error", "pp/tp/pptp with parallelLevel but no torchrun section (never READY)")
TORCHRUN_WITHOUT_NPROC = _rule("TSP203", "error", "a torchrun section without nproc-per-node beside parallelLevel (silently 1 process)")
CUSTOM_MULTI_GPU_SYNC = _rule("TSP204", "error", "custom with parallelLevel > 1 but no asyncCommunication (never READY)")
CUSTOM_WITH_TORCHRUN = _rule("TSP205", "error", "a torchrun section under a one-process parallelType (custom)")
PARALLEL_WITHOUT_TYPE = _rule("TSP206", "error", "parallelLevel or torchrun without parallelType (ignored)")
MULTI_NODE_NO_ENDPOINT = _rule("TSP207", "error", "torchrun.nnodes > 1 without rdzv-endpoint (the other nodes cannot "
                               "find the rendezvous)")
MULTI_NODE_STATIC = _rule("TSP221", "error", "tp or pptp across nodes without continuousBatching (the other nodes' "
                          "ranks get their batches from rank 0's step loop)")
DROPPED_TORCHRUN_KEY = _rule("TSP222", "warning", "a torchrun key TorchServe 0.12 reads but never passes to torchrun")
MULTI_NODE_STARTUP = _rule("TSP223", "warning", "nnodes > 1 with startupTimeout under 300 s (every node loads its "
                           "part before the worker is READY)")
MULTI_NODE_WORKERS = _rule("TSP224", "warning", "maxWorkers > 1 with nnodes > 1 (each worker needs its own "
                           "`ts-plugin join` on every other node)")
PPTP_NO_PP_SIZE = _rule("TSP208", "error", "pptp without pippy.pp_size")
PPTP_PP_SIZE_DIVIDES = _rule("TSP209", "error", "pippy.pp_size does not divide the world size")
ASYNC_BATCHING = _rule("TSP211", "error", "asyncCommunication with batchSize > 1 (the frontend's async batcher crashes)")
SINGLE_RANK = _rule("TSP210", "warning", "a pp/tp/pptp worker with a single rank")
SHARED_RENDEZVOUS = _rule("TSP212", "warning", "torchrun on the host-wide default rendezvous localhost:29400 "
                          "(one model's restart restarts the others)")
CB_ASYNC = _rule("TSP213", "error", "continuousBatching with asyncCommunication (the async worker re-sends running "
                 "requests without waiting for their answers, then drops the worker)")
CB_SEQUENCE = _rule("TSP214", "error", "continuousBatching with sequenceBatching (the frontend's "
                    "SequenceContinuousBatching is used instead: a sequence per request, maxNumSequence at once)")
CB_BATCH_ONE = _rule("TSP215", "warning", "continuousBatching with batchSize 1 (one request at a time: a request "
                     "that arrives while another streams waits until it ends)")
CB_UNSET = _rule("TSP217", "warning", "batchSize > 1 with continuousBatching not set (static batching: a request that "
                 "arrives while a batch generates waits for the batch's longest request)")
STEPS_UNUSED = _rule("TSP218", "warning", "handler.steps_per_call without continuousBatching (only continuous "
                     "batching reads it)")
WHOLE_PREFILL = _rule("TSP220", "warning", "handler.max_num_batched_tokens null (a whole prompt is one forward, which "
                      "must end within responseTimeout and stalls every running request)")
COMPILE_STARTUP = _rule("TSP225", "warning", "handler.compile_step with startupTimeout under 300 s (the step compiles "
                       "at load: 30-140 s on 2 CPUs, longer for larger models)")
COMPILE_STAGES = _rule("TSP226", "warning", "handler.compile_step under pp or pptp (their stages run eagerly)")
PP_ON_CPU = _rule("TSP227", "warning", "pp on CPU with overlapping row groups (pippy.chunks > 1) or one thread a stage "
                  "(the stages share the host's cores and memory bandwidth)")
MULTI_NODE_PLAIN_C10D = _rule("TSP228", "warning", "nnodes > 1 on plain c10d (a node that never joins fails the "
                              "worker through TorchServe's generic 507, naming no node)")
DEVICE_IDS_DUPLICATE = _rule("TSP301", "error", "deviceIds lists a GPU twice")
DEVICE_IDS_NEGATIVE = _rule("TSP302", "error", "a negative GPU id in deviceIds")
DEVICE_IDS_TOO_FEW = _rule("TSP303", "error", "deviceIds shorter than the GPUs one worker needs")
DEVICE_IDS_NOT_MULTIPLE = _rule("TSP304", "error", "len(deviceIds) is not a multiple of the GPUs per worker")
DEVICE_IDS_ON_CPU = _rule("TSP305", "error", "deviceIds with deviceType cpu")
MORE_GPUS_THAN_HOST = _rule("TSP306", "error", "more GPUs asked for than the host has")
WORKERS_MIN_OVER_MAX = _rule("TSP401", "error", "minWorkers > maxWorkers (ignored by the frontend)")
WORKERS_MIN_ZERO = _rule("TSP402", "warning", "minWorkers 0 (the frontend makes it 1)")
SECTION_CONFLICT = _rule("TSP501", "error", "a section or key that contradicts the parallelType")
CHUNKS_OVER_BATCH = _rule("TSP502", "warning", "pippy.chunks larger than batchSize (some micro-batches stay empty)")
MAX_MEMORY_KEY = _rule("TSP503", "error", "handler.max_memory key that is not a GPU id, cpu or disk")
CHUNKS_OVER_STAGES = _rule("TSP504", "warning", "pp with pippy.chunks larger than the pipeline stages (at most one "
                           "micro-batch per stage is in flight)")
CHUNKS_UNDER_PPTP = _rule("TSP505", "warning", "pptp with pippy.chunks > 1 (pptp generates each batch as one group)")
PATH_ABSOLUTE = _rule("TSP601", "error", "an absolute path where a file inside the archive is expected")
PATH_ESCAPES = _rule("TSP602", "error", "a path that leaves the model folder")
FILE_MISSING = _rule("TSP603", "error", "a referenced file is not among the archive's files")
FILE_NOT_JSON = _rule("TSP604", "error", "a referenced JSON file does not parse")
TP_SIZE_MISMATCH = _rule("TSP605", "error", "DeepSpeed tp_size (or mp_size) differs from the world size")
MODEL_PATH_MISSING = _rule("TSP606", "warning", "an absolute handler.model_path that does not exist on this host")
TRUST_REMOTE_CODE = _rule("TSP607", "warning", "handler.trust_remote_code runs code shipped with the model")
GPU_EXPECTED = _rule("TSP608", "warning", "deviceType gpu on a host without GPUs (the frontend falls back to cpu)")
FILE_NOT_BESIDE = _rule("TSP609", "warning", "a referenced file is neither beside the config nor in the model folder "
                        "(without --extra-files the archive's contents are unknown)")
HEADS_NOT_DIVISIBLE = _rule("TSP610", "error", "pptp's tensor-parallel size does not divide the model's attention "
                            "heads (the worker would fail every request)")
CHECKPOINT_UNPICKLED = _rule("TSP611", "warning", "a DeepSpeed checkpoint, which DeepSpeed loads with "
                             "torch.load(weights_only=False): a file in it can run code")

#: keys of DeepSpeed's inference config (the JSON named by deepspeed.config) that name files or folders
DS_CONFIG_FILE_KEYS = ("checkpoint", "save_mp_checkpoint_path", "base_dir")


@dataclass
class Finding:
    code: str
    severity: Severity
    key: str
    line: int
    column: int
    message: str
    hint: str

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def format(self, source: str) -> str:
        return f"{source}:{self.line}:{self.column}: {self.severity} {self.code} [{self.key}] {self.message}\n    hint: {self.hint}"


@dataclass
class ValidationContext:
    """What the validator may look at besides the YAML text.

    archive_files: archive-relative path -> local file, when the archive's contents are known
    (`ts-plugin archive`, `validate --extra-files`). model_dir: the unpacked model folder at
    worker start. gpus: GPUs on the serving host, when known.
    """

    config_dir: Optional[Path] = None
    archive_files: Optional[Dict[str, Path]] = None
    model_dir: Optional[Path] = None
    gpus: Optional[int] = None


@dataclass
class Report:
    source: str
    findings: List[Finding] = field(default_factory=list)
    config: Optional[ModelConfig] = None
    layout: Optional[ParallelLayout] = None
    #: the JSON that deepspeed.config names, as validation read it ({} when none): the engine takes it from here
    deepspeed_file: Dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> List[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def text(self) -> str:
        return "\n".join(f.format(self.source) for f in self.findings)


class _Collector:
    def __init__(self, loaded: LoadedYaml):
        self.loaded = loaded
        self.findings: List[Finding] = []
        self.deepspeed_file: Dict[str, Any] = {}

    def add(self, rule: Rule, path: Tuple[Any, ...], message: str, hint: str) -> None:
        line, column = self.loaded.position(path)
        self.findings.append(Finding(rule.code, rule.severity, key_name(path), line, column, message, hint))


def key_name(path: Tuple[Any, ...]) -> str:
    """('deviceIds', 1) -> 'deviceIds[1]'; () -> '<file>'."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "<file>"


def validate_text(text: str, source: str = "model-config.yaml", context: Optional[ValidationContext] = None) -> Report:
    """Validate the text of a model-config.yaml.

    Example:
        >>> report = validate_text("parallelType: tp\\nparallelLevel: 2\\n")
        >>> [f.code for f in report.errors]
        ['TSP202']
    """
    report = Report(source)
    if not text.strip():
        report.findings.append(Finding(EMPTY_FILE.code, "error", "<file>", 1, 1, "the file is empty",
                                       "write at least `minWorkers: 1`, or leave --config-file out"))
        return report
    try:
        loaded = load_yaml(text)
    except YamlSyntaxError as err:
        report.findings.append(Finding(YAML_SYNTAX.code, "error", "<file>", err.line, err.column,
                                       f"YAML syntax error: {err}",
                                       "fix the YAML; TorchServe would log this and serve with all defaults"))
        return report
    return validate_data(loaded.data, source, context, positions=loaded)


def validate_data(data: Any, source: str = "model-config.yaml", context: Optional[ValidationContext] = None,
                  positions: Optional[LoadedYaml] = None) -> Report:
    """Validate a model-config already parsed, as TorchServe hands it to the handler (`context.model_yaml_config`).
    `positions` (the file's `load_yaml`) gives each finding its line and column; without it they are all 1:1.

    Example:
        >>> [f.code for f in validate_data({"parallelType": "tp", "parallelLevel": 2}).errors]
        ['TSP202']
    """
    context = context or ValidationContext()
    report = Report(source)
    out = _Collector(positions or LoadedYaml(data))
    if data is None:
        out.add(EMPTY_FILE, (), "the file holds only comments", "write at least `minWorkers: 1`, or leave --config-file out")
        report.findings = out.findings
        return report
    if not isinstance(data, dict):
        out.add(NOT_A_MAPPING, (), f"the top level is a {type(data).__name__}, not a mapping",
                "write `key: value` lines at the top level, e.g. `parallelType: tp`")
        report.findings = out.findings
        return report
    for path in out.loaded.duplicates:
        out.add(DUPLICATE_KEY, path, f"`{path[-1]}` is set more than once; only the last value counts",
                "keep one of them")
    _check_keys(data, out)
    config = _parse(data, out)
    layout = ParallelLayout.of(config)
    _check_parallel(config, layout, out)
    _check_devices(config, layout, out, context)
    _check_sections(config, layout, out)
    _check_files(config, layout, out, context)
    _check_model(config, layout, out, context)
    report.findings = sorted(out.findings, key=lambda f: (f.line, f.column, f.code))
    report.config, report.layout, report.deepspeed_file = config, layout, out.deepspeed_file
    return report


def validate_file(path: os.PathLike, context: Optional[ValidationContext] = None) -> Report:
    """Validate a model-config.yaml file; relative paths in it are looked up beside it by default."""
    path = Path(path)
    context = context or ValidationContext()
    if context.config_dir is None:
        context = ValidationContext(path.parent, context.archive_files, context.model_dir, context.gpus)
    return validate_text(path.read_text(encoding="utf-8"), str(path), context)


# --- keys and types -------------------------------------------------------------------------------

def _normalise(key: str) -> str:
    return key.lower().replace("-", "").replace("_", "")


def _near_miss(key: str, known: List[str]) -> Optional[str]:
    """A known key that `key` differs from only by case, `-`/`_`, or a typo or two."""
    by_normal = {_normalise(candidate): candidate for candidate in known}
    close = difflib.get_close_matches(_normalise(key), list(by_normal), n=1, cutoff=0.9)
    return by_normal[close[0]] if close else None


def _check_keys(data: Dict[str, Any], out: _Collector) -> None:
    for prefix, model in SECTIONS.items():
        section = data
        for part in prefix:
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict):
            continue
        known = known_keys(model)
        for key in section:
            if not isinstance(key, str) or key in known:
                continue
            guess = _near_miss(key, known)
            if model is TorchrunConfig:
                hint = f"did you mean `{guess}`?" if guess else f"the frontend reads only: {', '.join(known)}"
                out.add(IGNORED_TORCHRUN_KEY, prefix + (key,),
                        f"torchrun key `{key}` is not read by TorchServe 0.12 and would be ignored", hint)
            elif guess:
                out.add(NEAR_MISS_KEY, prefix + (key,), f"unknown key `{key}` would be ignored",
                        f"did you mean `{guess}`?")


_CHOICE_ERRORS = {"literal_error", "enum"}
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _parse(data: Dict[str, Any], out: _Collector) -> ModelConfig:
    """Build the typed config; each invalid value is reported once and dropped, so the rest is checked."""
    data = copy.deepcopy(data)
    reported = set()
    for _ in range(50):
        try:
            return ModelConfig.model_validate(data)
        except ValidationError as err:
            errors = err.errors()
        for error in _first_per_location(errors):
            path = tuple(p for p in error["loc"] if not _is_union_tag(p))
            if error["type"] == "extra_forbidden":
                _drop(data, path)  # reported by _check_keys
                continue
            if path not in reported:
                reported.add(path)
                _report_value_error(error, path, out)
            _drop(data, path)
    raise RuntimeError("model-config.yaml could not be reduced to a valid config")  # pragma: no cover


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the union member or constraint to a location, e.g. ('handler', 'device_map', 'literal[...]')
    return isinstance(part, str) and ("[" in part or part in {"int", "str", "float", "bool", "constrained-int"})


def _first_per_location(errors: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    seen, first = set(), []
    for error in errors:
        path = tuple(p for p in error["loc"] if not _is_union_tag(p))
        if path not in seen:
            seen.add(path)
            first.append(error)
    return first


def _drop(data: Any, path: Tuple[Any, ...]) -> None:
    target = data
    for part in path[:-1]:
        target = target[part]
    if isinstance(target, list):
        del target[:]  # one bad item invalidates the list, as in the frontend
    else:
        target.pop(path[-1], None)


def _report_value_error(error: Dict[str, Any], path: Tuple[Any, ...], out: _Collector) -> None:
    value = error.get("input")
    shown = json.dumps(value) if isinstance(value, (str, int, float, bool)) or value is None else repr(value)
    key = key_name(path)
    if error["type"] in _CHOICE_ERRORS or "literal" in error["type"]:
        expected = error.get("ctx", {}).get("expected", "")
        out.add(INVALID_CHOICE, path, f"`{key}` is {shown}; allowed: {expected}",
                f"use one of {expected}")
    elif error["type"] in _RANGE_ERRORS:
        out.add(OUT_OF_RANGE, path, f"`{key}` is {shown}: {error['msg']}", f"set `{key}` to an allowed number")
    else:
        if isinstance(value, str) and error["type"] in {"int_type", "float_type", "bool_type", "int_parsing"}:
            hint = f"write {value} without quotes"
        else:
            hint = f"give `{key}` a value of the type the message names"
        out.add(WRONG_TYPE, path, f"`{key}` is {shown} ({type(value).__name__}): {error['msg']}",
                hint + "; TorchServe would ignore this value and keep its default")


# --- cross-field rules ----------------------------------------------------------------------------

def _check_parallel(config: ModelConfig, layout: ParallelLayout, out: _Collector) -> None:
    ptype, level, torchrun = config.parallel_type, config.parallel_level, config.torchrun
    nproc = torchrun.nproc_per_node if torchrun else None
    if config.async_communication and config.batch_size > 1:
        out.add(ASYNC_BATCHING, ("batchSize",),
                f"asyncCommunication: true with batchSize {config.batch_size}: TorchServe 0.12's async batcher "
                "crashes its worker thread whenever it batches two requests, which are then never answered",
                "set `batchSize: 1` (each request is then generated on its own)")
    _check_continuous(config, out)
    if ptype is None:
        for path, value in ((("parallelLevel",), level), (("torchrun",), torchrun)):
            if value is not None:
                out.add(PARALLEL_WITHOUT_TYPE, path, f"`{path[0]}` is set but parallelType is not, so TorchServe ignores it",
                        f"add `parallelType: {'|'.join(PARALLEL_TYPES)}`, or remove it")
        return
    if torchrun is not None:
        _check_torchrun(config, torchrun, ptype, out)
    if not parallel_type(ptype).torchrun:
        if torchrun is not None:
            out.add(CUSTOM_WITH_TORCHRUN, ("torchrun",), f"parallelType {ptype} runs one process, but a torchrun section is set",
                    "remove the torchrun section; give the process GPUs with `parallelLevel: N` + `asyncCommunication: true`")
        if ptype == "custom" and level is not None and level > 1 and not config.async_communication:
            out.add(CUSTOM_MULTI_GPU_SYNC, ("parallelLevel",),
                    f"parallelType custom with parallelLevel {level} never reaches READY without asyncCommunication",
                    "add `asyncCommunication: true` (the ts_plugin accelerate handler supports it), or remove parallelLevel")
        return
    if nproc is not None and level is not None:
        out.add(LEVEL_AND_NPROC, ("parallelLevel",),
                f"parallelLevel {level} and torchrun.nproc-per-node {nproc} are both set; they are mutually exclusive",
                f"remove `parallelLevel` and keep `torchrun: {{nproc-per-node: {nproc}}}`")
    elif level is not None and torchrun is None:
        out.add(LEVEL_WITHOUT_TORCHRUN, ("parallelLevel",),
                f"parallelType {ptype} with parallelLevel {level} but no torchrun section: the frontend never reaches READY",
                f"replace `parallelLevel: {level}` with `torchrun: {{nproc-per-node: {level}}}`")
    elif level is not None and nproc is None:
        out.add(TORCHRUN_WITHOUT_NPROC, ("torchrun",),
                f"a torchrun section without nproc-per-node makes parallelLevel {level} silently 1 process",
                f"move it into the section: `torchrun: {{nproc-per-node: {level}}}` and remove `parallelLevel`")
    if ptype == "pptp":
        pp_size = config.pippy.pp_size if config.pippy else None
        if pp_size is None:
            out.add(PPTP_NO_PP_SIZE, ("pippy",) if config.pippy else ("parallelType",),
                    "parallelType pptp needs pippy.pp_size (the number of pipeline stages)",
                    f"add `pippy: {{pp_size: 2}}` with a divisor of the world size {layout.world_size}")
        elif layout.world_size % pp_size:
            out.add(PPTP_PP_SIZE_DIVIDES, ("pippy", "pp_size"),
                    f"pippy.pp_size {pp_size} does not divide the world size {layout.world_size}",
                    f"use a divisor of {layout.world_size} for pp_size, or change nproc-per-node")
    if torchrun is not None and _default_rendezvous(torchrun):
        # Seen with TorchServe 0.12: the first torchrun on the host hosts the c10d store on 29400 and every later
        # one connects to it. When a rank of the hosting model dies, the frontend kills that torchrun and with it
        # the store; the agents of every other torchrun model lose it and tear their ranks down too.
        shown = f"`{torchrun.rdzv_endpoint}`" if torchrun.rdzv_endpoint else "not set"
        out.add(SHARED_RENDEZVOUS, ("torchrun", "rdzv-endpoint") if torchrun.rdzv_endpoint else ("torchrun",),
                f"torchrun.rdzv-endpoint is {shown}, so this model's torchrun shares the c10d store on port "
                f"{DEFAULT_RDZV_PORT} with every torchrun on the host; whichever started first hosts it, and when "
                "that worker restarts (a rank dies, the model is unloaded) every other model sharing it restarts too",
                "give each model its own: `torchrun: {rdzv-endpoint: localhost:<port>}` with a free port that no "
                "other model or server on this host uses")
    if layout.world_size == 1 and ptype in ("pp", "tp"):
        out.add(SINGLE_RANK, ("torchrun",) if torchrun else ("parallelType",),
                f"parallelType {ptype} with a single rank does no parallelism",
                "set `torchrun: {nproc-per-node: N}` with N > 1, or drop parallelType")


#: torchrun keys TorchServe 0.12 parses and then drops (WorkerLifeCycle.attachRunner): field -> key
_DROPPED_TORCHRUN_KEYS = {"rdzv_conf": "rdzv-conf", "monitor_interval": "monitor-interval", "node_rank": "node-rank"}
MULTI_NODE_STARTUP_S = 300
#: how long rdzv-backend ts-plugin waits for the other nodes on the frontend's host (ts_plugin/_rendezvous.py):
#: within TorchServe's fixed 2 minutes for a worker's start, with time left for torchrun's start and the ranks' report
RDZV_JOIN_TIMEOUT_S = 100


def _check_torchrun(config: ModelConfig, torchrun: TorchrunConfig, ptype: str, out: _Collector) -> None:
    """Keys TorchServe drops, and what a model across nodes needs (README, "Across hosts")."""
    for name, key in _DROPPED_TORCHRUN_KEYS.items():
        if name in torchrun.model_fields_set:
            out.add(DROPPED_TORCHRUN_KEY, ("torchrun", key),
                    f"torchrun.{key} is read by TorchServe 0.12 but never passed to torchrun, so it has no effect",
                    f"remove `{key}`" + (": the frontend's node is found by `ts-plugin join`'s ranks, whatever rank "
                                         "the rendezvous gives it" if key == "node-rank" else ""))
    if torchrun.nnodes == 1 or not parallel_type(ptype).torchrun:
        return
    if not torchrun.rdzv_endpoint:
        out.add(MULTI_NODE_NO_ENDPOINT, ("torchrun", "nnodes"),
                f"torchrun.nnodes is {torchrun.nnodes} but rdzv-endpoint is not set, so torchrun waits on "
                "localhost:29400, which the other nodes cannot reach",
                "add `rdzv-endpoint: <this host's address>:<free port>`; run `ts-plugin join MODEL.mar` on each "
                "other node")
    if ptype in ("tp", "pptp") and not config.continuous_batching:
        out.add(MULTI_NODE_STATIC, ("torchrun", "nnodes"),
                f"parallelType {ptype} across {torchrun.nnodes} nodes needs continuousBatching: the frontend sends "
                "batches to its own host's ranks only, and only continuous batching's step loop hands them to the "
                "other nodes' ranks",
                "add `continuousBatching: true` and `batchSize: 8` (or the rows that may generate together)")
    if config.max_workers > 1:
        out.add(MULTI_NODE_WORKERS, ("maxWorkers",),
                f"maxWorkers {config.max_workers} with {torchrun.nnodes} nodes: each worker is a rendezvous of its own, "
                "and `ts-plugin join --management-address` joins a model's first worker only",
                "set `minWorkers: 1` and `maxWorkers: 1` (scale with more hosts or replicas), or run one join per "
                "worker on each node with `--rdzv-id <model>_<worker id>`")
    if torchrun.rdzv_backend == "c10d":
        out.add(MULTI_NODE_PLAIN_C10D, ("torchrun", "rdzv-backend") if "rdzv_backend" in torchrun.model_fields_set
                else ("torchrun", "nnodes"),
                f"torchrun.rdzv-backend is c10d with {torchrun.nnodes} nodes: TorchServe drops rdzv-conf, so a node "
                "that never joins leaves torchrun waiting until TorchServe's 2-minute limit on a worker's start, "
                "whose 507 'Failed to start workers' names no node",
                "set `rdzv-backend: ts-plugin` (c10d's rendezvous, ending its wait after "
                f"{RDZV_JOIN_TIMEOUT_S} s with an error in model_log.log naming the missing nodes and their "
                "`ts-plugin join` command)")
    if config.startup_timeout < MULTI_NODE_STARTUP_S:
        out.add(MULTI_NODE_STARTUP, ("startupTimeout",) if "startup_timeout" in config.model_fields_set
                else ("torchrun", "nnodes"),
                f"startupTimeout is {config.startup_timeout} s with {torchrun.nnodes} nodes; every node reads its "
                "part of the model from its own disk and the worker is READY only when the slowest has",
                f"set `startupTimeout: {MULTI_NODE_STARTUP_S}` or more (the other nodes' `ts-plugin join` must "
                "also start within 2 minutes of the worker, a limit fixed in TorchServe 0.12)")


def _check_continuous(config: ModelConfig, out: _Collector) -> None:
    """From the frontend's code (pytorch/serve v0.12.0 WorkLoadManager, ContinuousBatching, AsyncWorkerThread)."""
    if "max_num_batched_tokens" in config.handler.model_fields_set and config.handler.max_num_batched_tokens is None:
        # WorkerThread waits responseTimeout per message: the handler keeps long batches alive between steps,
        # never inside one forward
        out.add(WHOLE_PREFILL, ("handler", "max_num_batched_tokens"),
                "handler.max_num_batched_tokens is null, so every prompt is prefilled whole in one forward: the "
                f"frontend kills the worker when one forward outlasts responseTimeout ({config.response_timeout} s) "
                "and every request in flight fails, and running requests get no token meanwhile",
                "remove it (default 256) or set a number of tokens whose forward takes well under responseTimeout")
    if not config.continuous_batching:
        if config.handler.steps_per_call > 1:
            out.add(STEPS_UNUSED, ("handler", "steps_per_call"),
                    f"handler.steps_per_call {config.handler.steps_per_call} is not used: static batching runs every "
                    "request to its end in one call",
                    "set `continuousBatching: true`, or remove `steps_per_call`")
        if (config.batch_size > 1 and "continuous_batching" not in config.model_fields_set
                and not config.async_communication and not config.sequence_batching):
            out.add(CB_UNSET, ("batchSize",),
                    f"batchSize {config.batch_size} without continuousBatching is static batching: a request that "
                    "arrives while a batch generates waits until the batch's longest request ends",
                    "set `continuousBatching: true` to let requests join and leave at every step, or "
                    "`continuousBatching: false` to keep static batching (and this warning quiet)")
        return
    if config.async_communication:
        out.add(CB_ASYNC, ("asyncCommunication",),
                "continuousBatching with asyncCommunication: TorchServe 0.12's async worker sends the running requests "
                "again and again without waiting for the answers (hundreds of copies a second), and the first answer "
                "after a request's last piece makes the frontend drop the worker ('Unexpected job in "
                "sendResponse()'): every other request in flight fails with 500 'Worker died.' or is never answered",
                "remove `asyncCommunication` (continuous batching already lets requests join at every step)")
    if config.sequence_batching:
        out.add(CB_SEQUENCE, ("sequenceBatching",),
                "continuousBatching with sequenceBatching: the frontend then uses its SequenceContinuousBatching "
                "(each request a sequence of its own, calls of up to twice batchSize rows); at most maxNumSequence "
                "requests (default 1) run at once, the others get 503 while the sequences live, and without "
                "sequenceMaxIdleMSec every request fails with 500 (NullPointerException)",
                "remove `sequenceBatching`")
    if config.batch_size == 1:
        out.add(CB_BATCH_ONE, ("batchSize",),
                "continuousBatching with batchSize 1: the batch holds one request, so a request that arrives while "
                "another streams waits until it ends",
                "set `batchSize` to the number of requests that may generate together, e.g. 8")


COMPILE_STARTUP_S = 300  # the load of a compiled step: 30-140 s measured on 2 CPUs, with room for larger models
DEFAULT_RDZV_PORT = 29400  # torchrun's c10d default (torch.distributed.elastic.rendezvous)


def _default_rendezvous(torchrun: TorchrunConfig) -> bool:
    """No rdzv-endpoint (torchrun's default localhost:29400), or one on port 29400 (also the default port when
    the endpoint has none)."""
    if torchrun.rdzv_backend not in ("c10d", "ts-plugin"):  # ts-plugin is c10d's store with a bounded wait
        return False
    endpoint = (torchrun.rdzv_endpoint or "").strip()
    if not endpoint:
        return True
    host, sep, port = endpoint.rpartition(":")
    if not sep or "]" in port:  # "host" or "[::1]": no port
        return True
    return port.strip() == str(DEFAULT_RDZV_PORT)


def _check_devices(config: ModelConfig, layout: ParallelLayout, out: _Collector, context: ValidationContext) -> None:
    ids = config.device_ids
    gpus = context.gpus
    per_worker = layout.gpus_per_worker
    if ids:
        if config.device_type == "cpu":
            out.add(DEVICE_IDS_ON_CPU, ("deviceIds",), f"deviceIds {ids} is set with deviceType cpu",
                    "remove deviceIds, or set `deviceType: gpu`")
        seen = set()
        for index, gpu in enumerate(ids):
            if gpu < 0:
                out.add(DEVICE_IDS_NEGATIVE, ("deviceIds", index), f"deviceIds[{index}] is {gpu}; GPU ids start at 0",
                        "list GPU ids as shown by nvidia-smi")
            elif gpu in seen:
                out.add(DEVICE_IDS_DUPLICATE, ("deviceIds", index), f"GPU {gpu} appears twice in deviceIds {ids}",
                        "list each GPU once")
            seen.add(gpu)
            if gpus is not None and gpu >= gpus:
                out.add(MORE_GPUS_THAN_HOST, ("deviceIds", index),
                        f"deviceIds[{index}] is {gpu} but the host has {gpus} GPU(s); the frontend would drop the whole list",
                        f"use ids 0..{gpus - 1}")
        if len(ids) < per_worker:
            out.add(DEVICE_IDS_TOO_FEW, ("deviceIds",),
                    f"deviceIds lists {len(ids)} GPU(s) but one worker needs {per_worker}",
                    f"list at least {per_worker} GPU ids")
        elif len(ids) % per_worker:
            out.add(DEVICE_IDS_NOT_MULTIPLE, ("deviceIds",),
                    f"deviceIds lists {len(ids)} GPUs, not a multiple of the {per_worker} each worker takes",
                    f"list a multiple of {per_worker} GPU ids")
    if gpus is not None and config.device_type == "gpu":
        if gpus == 0:
            out.add(GPU_EXPECTED, ("deviceType",), "deviceType gpu, but this host has no GPU",
                    "serve on a GPU host, or set `deviceType: cpu`")
        elif per_worker > gpus:
            out.add(MORE_GPUS_THAN_HOST, ("torchrun", "nproc-per-node") if config.torchrun else ("parallelLevel",),
                    f"one worker needs {per_worker} GPUs but the host has {gpus}",
                    f"use at most {gpus} per worker")
    if config.min_workers > config.max_workers:
        out.add(WORKERS_MIN_OVER_MAX, ("minWorkers",),
                f"minWorkers {config.min_workers} > maxWorkers {config.max_workers}",
                "make minWorkers <= maxWorkers (for large models usually both 1)")
    if config.min_workers < 1:
        out.add(WORKERS_MIN_ZERO, ("minWorkers",), f"minWorkers {config.min_workers} becomes 1 in the frontend",
                "set `minWorkers: 1`")


def _check_pp_on_cpu(config: ModelConfig, out: _Collector) -> None:
    chunks = config.pippy.chunks if config.pippy else 1
    threads = config.torchrun.omp_number_threads if config.torchrun else 1
    threads_fix = ("`torchrun: {OMP_NUMBER_THREADS: N}`, N the cores one worker may use (SmolLM2 on 2 cores, served: "
                   "chunks 1 with 2 threads a stage gave 1.18x the tokens/s of chunks 2 with 1)")
    if chunks > 1:
        out.add(PP_ON_CPU, ("pippy", "chunks"),
                f"pippy.chunks {chunks} on CPU: the stages share the host's memory bandwidth, so row groups that "
                f"overlap across stages read each stage's weights {chunks} times a token instead of once",
                f"set `chunks: 1` and {threads_fix}")
    elif threads == 1:
        out.add(PP_ON_CPU, ("torchrun", "OMP_NUMBER_THREADS"),
                "each pipeline stage runs on one CPU thread (torchrun.OMP_NUMBER_THREADS 1), and with one group of "
                "rows (chunks 1) the stages take turns: one core works while the others wait",
                f"set {threads_fix}")


def _check_sections(config: ModelConfig, layout: ParallelLayout, out: _Collector) -> None:
    ptype, record = config.parallel_type, parallel_type(config.parallel_type)
    for path, used_by in ((("deepspeed",), "tensor_parallel"), (("pippy",), "pipeline"),
                          (("handler", "device_map"), "device_map")):
        if record is not None and not getattr(record, used_by) and _value_at(config, path) is not None:
            key = ".".join(path)
            out.add(SECTION_CONFLICT, path, f"{key} is never used under parallelType {ptype}",
                    f"remove it, or use parallelType {names(**{used_by: True})}")
    if config.pippy is not None and ptype == "pp" and config.pippy.chunks > config.batch_size:
        out.add(CHUNKS_OVER_BATCH, ("pippy", "chunks"),
                f"pippy.chunks {config.pippy.chunks} > batchSize {config.batch_size}: a batch never fills all micro-batches",
                f"raise batchSize to at least {config.pippy.chunks}, or lower chunks")
    if config.pippy is not None and ptype == "pp" and config.pippy.chunks > layout.pp_size:
        out.add(CHUNKS_OVER_STAGES, ("pippy", "chunks"),
                f"pippy.chunks {config.pippy.chunks} > {layout.pp_size} pipeline stages: a batch is split into "
                f"{layout.pp_size} micro-batches, one per stage (more could not all be in flight, and each would "
                "read the stage's weights once more per token)",
                f"set `chunks: {layout.pp_size}`")
    if ptype == "pp" and config.device_type == "cpu" and layout.pp_size > 1:
        _check_pp_on_cpu(config, out)
    if config.pippy is not None and ptype == "pptp" and config.pippy.chunks > 1:
        out.add(CHUNKS_UNDER_PPTP, ("pippy", "chunks"),
                f"pippy.chunks {config.pippy.chunks} is not used by parallelType pptp: every rank runs each batch as "
                "one group of rows through its stage",
                "remove `chunks` (micro-batches that overlap across stages are a parallelType pp feature)")
    for key in config.handler.max_memory or {}:
        if parse_device(key) is None:  # the engine reads the keys with the same function
            out.add(MAX_MEMORY_KEY, ("handler", "max_memory", key), f"handler.max_memory key {key!r} is not a GPU id, cpu or disk",
                    "use keys like 0, 1 (or cuda:1), cpu, disk")
    if config.handler.trust_remote_code:
        out.add(TRUST_REMOTE_CODE, ("handler", "trust_remote_code"),
                "handler.trust_remote_code is true: Python code in the model folder will run in every worker",
                "keep it only for model folders you trust")
    if config.handler.compile_step:
        if ptype in ("pp", "pptp"):
            out.add(COMPILE_STAGES, ("handler", "compile_step"),
                    f"handler.compile_step is not used under parallelType {ptype}: pipeline stages run eagerly",
                    "remove it, or use parallelType custom or tp")
        elif config.startup_timeout < COMPILE_STARTUP_S:
            out.add(COMPILE_STARTUP, ("handler", "compile_step"),
                    f"handler.compile_step compiles the step at load, 30-140 s on 2 CPUs for a 135M model (more for "
                    f"larger ones), and startupTimeout is {config.startup_timeout} s: TorchServe kills a worker whose "
                    "load outlasts it",
                    f"set `startupTimeout: {COMPILE_STARTUP_S}` or more")
    tp_sizes = []
    if config.deepspeed is not None:
        if config.deepspeed.tensor_parallel and config.deepspeed.tensor_parallel.tp_size is not None:
            tp_sizes.append((("deepspeed", "tensor_parallel", "tp_size"), config.deepspeed.tensor_parallel.tp_size,
                             "deepspeed.tensor_parallel.tp_size"))
        if config.deepspeed.mp_size is not None:
            tp_sizes.append((("deepspeed", "mp_size"), config.deepspeed.mp_size, "deepspeed.mp_size"))
    _check_tp_sizes(tp_sizes, layout, out)


def _value_at(config: ModelConfig, path: Tuple[str, ...]) -> Any:
    value: Any = config
    for part in path:
        value = getattr(value, part)
    return value


def _check_tp_sizes(sizes: List[Tuple[Tuple[Any, ...], int, str]], layout: ParallelLayout, out: _Collector) -> None:
    record = parallel_type(layout.parallel_type)
    if record is None or not record.tensor_parallel:
        return
    for path, size, name in sizes:
        if size != layout.tp_size:
            what = "world size / pp_size" if record.pipeline else "the world size"
            out.add(TP_SIZE_MISMATCH, path, f"{name} is {size} but {what} is {layout.tp_size}",
                    f"set it to {layout.tp_size} or leave it out (ts_plugin derives it)")


def _check_files(config: ModelConfig, layout: ParallelLayout, out: _Collector, context: ValidationContext) -> None:
    ds = config.deepspeed
    archive_paths: List[Tuple[Tuple[Any, ...], Optional[str], bool]] = [
        (("deepspeed", "config"), ds.config if ds else None, True),
        (("deepspeed", "checkpoint"), ds.checkpoint if ds else None, True),
        (("handler", "offload_folder"), config.handler.offload_folder, False),
    ]
    for path, value, must_exist in archive_paths:
        if value is None:
            continue
        key = ".".join(path)
        if not _confined(out, path, key, value) or not must_exist:
            continue
        local = _locate(value, context, config.handler.model_path)
        if local is None:
            if context.archive_files is not None or context.model_dir is not None:
                out.add(FILE_MISSING, path, f"{key} names {value!r}, which is not in the archive",
                        f"add it with --extra-files (archive files: {', '.join(sorted(context.archive_files or {})[:8]) or 'none'})"
                        if context.model_dir is None else f"ship {value!r} inside the model archive")
            elif context.config_dir is not None:
                # a warning, not an error: --extra-files may bring it from elsewhere; `ts-plugin archive` and the
                # worker refuse the config if the archive lacks it
                out.add(FILE_NOT_BESIDE, path,
                        f"{key} names {value!r}, which is neither beside the config ({context.config_dir}) nor in the "
                        "model folder",
                        f"put {value!r} there, or check the archive's layout with `ts-plugin validate --extra-files "
                        "<the files you will archive>`")
            continue
        try:
            parsed = json.loads(local.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            out.add(FILE_NOT_JSON, path, f"{key} {value!r} is not valid JSON: {err}", "fix the JSON file")
            continue
        if path == ("deepspeed", "config") and isinstance(parsed, dict):
            out.deepspeed_file = parsed  # the engine builds DeepSpeed's settings from this, not from the file again
            sizes = []
            tp_section = parsed.get("tensor_parallel")
            if isinstance(tp_section, dict) and isinstance(tp_section.get("tp_size"), int):
                sizes.append((path, tp_section["tp_size"], f"tensor_parallel.tp_size in {value}"))
            if isinstance(parsed.get("mp_size"), int):
                sizes.append((path, parsed["mp_size"], f"mp_size in {value}"))
            _check_tp_sizes(sizes, layout, out)
            # DeepSpeed reads these itself: the same confinement as deepspeed.checkpoint
            for name in DS_CONFIG_FILE_KEYS:
                if isinstance(parsed.get(name), str):
                    _confined(out, path, f"{name} in {value}", parsed[name])
            checkpoint = parsed.get("checkpoint")
            if isinstance(checkpoint, dict):
                _check_checkpoint_files(checkpoint, path, f"checkpoint in {value}", out)
            if checkpoint is not None:
                _warn_unpickled(out, path, f"checkpoint in {value}")
        if path == ("deepspeed", "checkpoint") and isinstance(parsed, dict):
            _check_checkpoint_files(parsed, path, value, out)
            _warn_unpickled(out, path, key)
    model_path = config.handler.model_path
    if model_path:
        if not os.path.isabs(model_path) and _escapes(model_path):
            out.add(PATH_ESCAPES, ("handler", "model_path"), f"handler.model_path {model_path!r} leaves the model folder",
                    "use a path inside the model folder, or an absolute path on the serving host")
        elif os.path.isabs(model_path) and not os.path.exists(model_path):
            out.add(MODEL_PATH_MISSING, ("handler", "model_path"),
                    f"handler.model_path {model_path!r} does not exist on this host",
                    "fine if it exists on the serving host; otherwise ship the model in the archive and use a relative path")


def _check_model(config: ModelConfig, layout: ParallelLayout, out: _Collector, context: ValidationContext) -> None:
    """Rules that need the model's config.json, where the model folder can be seen."""
    if layout.parallel_type != "pptp" or layout.tp_size < 2:
        return
    local = _locate(os.path.join(config.handler.model_path or "", "config.json"), context)
    if local is None and config.handler.model_path and os.path.isabs(config.handler.model_path):
        local = Path(config.handler.model_path, "config.json")
    try:
        hf_config = json.loads(local.read_text(encoding="utf-8")) if local is not None else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # not this rule's business: loading the model reports it
    if not isinstance(hf_config, dict):
        return
    hf_config = hf_config.get("text_config", hf_config) if isinstance(hf_config.get("text_config"), dict) else hf_config
    problem = attention_split_problem(hf_config, layout.tp_size)
    if problem:
        path = ("torchrun", "nproc-per-node") if config.torchrun and config.torchrun.nproc_per_node else ("parallelType",)
        out.add(HEADS_NOT_DIVISIBLE, path, f"parallelType pptp with tp size {layout.tp_size} (world size "
                f"{layout.world_size} / pippy.pp_size {layout.pp_size}): {problem}", PPTP_HEADS_HINT)


PPTP_HEADS_HINT = ("use a tp size that divides both (nproc-per-node = pippy.pp_size x tp size), or serve this model "
                   "with parallelType tp (DeepSpeed splits uneven heads)")


def _head_counts(hf_config: Dict[str, Any]) -> Optional[Tuple[int, int]]:
    heads = hf_config.get("num_attention_heads", hf_config.get("n_head"))
    if not isinstance(heads, int):
        return None
    return heads, hf_config.get("num_key_value_heads") or heads


def attention_tp_sizes(hf_config: Dict[str, Any]) -> Optional[List[int]]:
    """The tp sizes that give every rank whole attention and key/value heads, or None when config.json's dict
    does not say how many heads there are."""
    counts = _head_counts(hf_config)
    if counts is None:
        return None
    heads, kv_heads = counts
    return [t for t in range(1, heads + 1) if heads % t == 0 and kv_heads % t == 0]


def attention_split_problem(hf_config: Dict[str, Any], tp_size: int) -> Optional[str]:
    """Why a model's attention heads cannot be split evenly over `tp_size` ranks (torch's ColwiseParallel cuts a
    projection into equal chunks, so each rank must get whole heads), or None. `hf_config`: config.json's dict."""
    fits = attention_tp_sizes(hf_config)
    if fits is None or tp_size in fits:
        return None
    heads, kv_heads = _head_counts(hf_config)
    return (f"the model's {heads} attention heads and {kv_heads} key/value heads do not both divide by {tp_size}; "
            f"tp sizes that work: {', '.join(map(str, fits))}")


def _confined(out: _Collector, path: Tuple[Any, ...], key: str, value: str) -> bool:
    """Whether `value` names a path inside the archive; if not, say so under `path` (TSP601, TSP602)."""
    if os.path.isabs(value):
        out.add(PATH_ABSOLUTE, path, f"{key} is the absolute path {value!r}; it must name a file inside the archive",
                f"ship it with --extra-files and write the archive-relative name, e.g. {os.path.basename(value)!r}")
        return False
    if _escapes(value):
        out.add(PATH_ESCAPES, path, f"{key} {value!r} leaves the model folder", "name a path inside the archive, without `..`")
        return False
    return True


def _check_checkpoint_files(checkpoint: Dict[str, Any], path: Tuple[Any, ...], where: str, out: _Collector) -> None:
    """DeepSpeed's checkpoint description ({"type", "checkpoints": [files] or {"tp": [...], "non_tp": [...]},
    "base_dir"}): every file it names stays inside the archive."""
    listed = checkpoint.get("checkpoints")
    groups = listed.values() if isinstance(listed, dict) else [listed]
    names = [name for group in groups if isinstance(group, list) for name in group if isinstance(name, str)]
    names += [name for name in (listed, checkpoint.get("base_dir")) if isinstance(name, str)]
    for name in names:
        _confined(out, path, f"a file listed in {where}", name)


def _warn_unpickled(out: _Collector, path: Tuple[Any, ...], where: str) -> None:
    out.add(CHECKPOINT_UNPICKLED, path, f"{where}: DeepSpeed unpickles these checkpoint files, and a pickle runs code",
            "load only checkpoints you made or trust; a safetensors model folder needs no DeepSpeed checkpoint "
            "(each tp rank reads its own slices)")


def _escapes(value: str) -> bool:
    parts = PurePosixPath(value.replace("\\", "/")).parts
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False


def _locate(value: str, context: ValidationContext, model_path: Optional[str] = None) -> Optional[Path]:
    """The local file behind an archive-relative name: in the unpacked archive, the archive's listed files, or
    (validate alone) beside the config, then in the model folder (handler.model_path, relative to the config's
    folder)."""
    normalised = os.path.normpath(value).replace("\\", "/")
    if context.model_dir is not None:
        candidate = context.model_dir / normalised
        return candidate if candidate.is_file() else None
    if context.archive_files is not None:
        return context.archive_files.get(normalised)
    if context.config_dir is not None:
        folders = [context.config_dir]
        if model_path and not _escapes(model_path):
            folders.append(context.config_dir / model_path)  # an absolute model_path replaces config_dir here
        return next((folder / normalised for folder in folders if (folder / normalised).is_file()), None)
    return None


def rules_table() -> str:
    """The rules reference as a Markdown table (the README embeds it)."""
    lines = ["| code | severity | rule |", "| --- | --- | --- |"]
    lines += [f"| {r.code} | {r.severity} | {r.title} |" for r in RULES.values()]
    return "\n".join(lines)
