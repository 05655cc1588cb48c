"""The schema of model-config.yaml: TorchServe 0.12's frontend keys and ts_plugin's sections.

This module is the single source of truth: the validator, `ts-plugin schema`, the handlers
and the README's configuration reference all derive from these models.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Literal, Optional, Union, get_args

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from .parallel_types import PARALLEL_TYPES

DeviceType = Literal["cpu", "gpu"]
ToolCallParser = Literal["hermes", "llama3_json", "mistral"]  # vLLM's names of the model families' tool-call markup
DeviceMapStrategy = Literal["auto", "balanced", "balanced_low_0", "sequential"]
DTypeName = Literal["float32", "float16", "bfloat16"]
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}  # accepted, stored canonical

DEVICE_MAP_STRATEGIES = get_args(DeviceMapStrategy)

# The frontend compares these case-insensitively (ModelConfig.java setParallelMode/setDeviceType).
def _lowercase(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _canonical_dtype(value: Any) -> Any:
    value = _lowercase(value)
    return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value


class _Section(BaseModel):
    # strict: the frontend ignores a quoted number, so we refuse it instead of coercing
    model_config = ConfigDict(strict=True, extra="allow")


class TorchrunConfig(_Section):
    """`torchrun:` - the only sub-keys the frontend reads; anything else it ignores."""

    model_config = ConfigDict(strict=True, extra="forbid")

    nnodes: int = Field(1, ge=1, description="Nodes. The frontend's host runs nproc-per-node ranks; every other node "
                                             "runs `ts-plugin join` (README: Across hosts).")
    nproc_per_node: Optional[int] = Field(
        None, alias="nproc-per-node", ge=1,
        description="Processes (ranks, one per GPU) per worker. Mutually exclusive with parallelLevel.")
    rdzv_backend: str = Field(
        "c10d", alias="rdzv-backend",
        description="torchrun rendezvous backend. `ts-plugin` is c10d whose wait for the other nodes ends within "
                    "TorchServe's limit, naming the missing ones (TSP228).")
    rdzv_endpoint: Optional[str] = Field(
        None, alias="rdzv-endpoint",
        description="host:port of the rendezvous; default localhost:29400, shared by every model on the host.")
    rdzv_conf: Optional[str] = Field(None, alias="rdzv-conf", description="Parsed but not passed to torchrun by TorchServe 0.12.")
    monitor_interval: Optional[Union[int, float]] = Field(
        None, alias="monitor-interval", description="Parsed but not passed to torchrun by TorchServe 0.12.")
    node_rank: Optional[int] = Field(None, alias="node-rank", description="Parsed but not passed to torchrun by TorchServe 0.12.")
    omp_number_threads: int = Field(1, alias="OMP_NUMBER_THREADS", ge=1, description="OMP_NUM_THREADS of every rank.")


class PippyConfig(_Section):
    """`pippy:` - pipeline parallelism (parallelType pp and pptp)."""

    chunks: int = Field(1, ge=1, description="Micro-batches per batch (pp: at most one per stage), generated "
                                              "concurrently so that the stages overlap across decode steps.")
    input_names: List[str] = Field(default_factory=lambda: ["input_ids"], description="Model inputs fed to stage 0.")
    model_type: Literal["HF"] = Field("HF", description="Only HuggingFace causal LMs are supported.")
    split_points: Optional[List[str]] = Field(
        None, description="Module names where stages begin (e.g. model.layers.2); by default the stages' decode "
                          "cost is balanced, the LM head's included.")
    pp_size: Optional[int] = Field(None, ge=1, description="Pipeline stages; required for pptp, must divide the world size.")
    rpc_timeout: Optional[Union[int, float]] = Field(
        None, gt=0, description="Legacy PiPPy RPC timeout in seconds; used as the process-group timeout.")
    num_worker_threads: Optional[int] = Field(None, ge=1, description="Legacy PiPPy RPC setting; accepted and ignored.")


class TensorParallelConfig(_Section):
    tp_size: Optional[int] = Field(None, ge=1, description="Tensor-parallel degree; must equal the world size.")


class DeepSpeedConfig(_Section):
    """`deepspeed:` - DeepSpeed inference (parallelType tp and pptp). Other keys are passed to init_inference."""

    config: Optional[str] = Field(None, description="A DeepSpeed inference JSON file inside the archive.")
    checkpoint: Optional[str] = Field(None, description="A DeepSpeed checkpoint JSON file inside the archive.")
    dtype: Optional[DTypeName] = Field(
        None, description="Default fp16 on GPU, fp32 on CPU; fp32, fp16, half and bf16 are read as their full names.")
    replace_with_kernel_inject: bool = Field(False, description="Kernel injection; GPU only.")
    tensor_parallel: Optional[TensorParallelConfig] = None
    mp_size: Optional[int] = Field(None, ge=1, description="Deprecated spelling of tensor_parallel.tp_size.")
    max_out_tokens: Optional[int] = Field(None, ge=1)
    injection_policy: Optional[Dict[str, Any]] = Field(None, description="Module class -> policy, for models AutoTP cannot shard.")

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_canonical(cls, value: Any) -> Any:
        return _canonical_dtype(value)


class HandlerConfig(_Section):
    """`handler:` - the ts_plugin base handler and its engines. Extra keys are kept for subclasses."""

    model_path: Optional[str] = Field(None, description="HF model folder: relative to the model folder, or absolute.")
    model_name: Optional[str] = Field(None, description="The model's name (as TorchServe's examples give the HF id); "
                                      "OpenAI's routes answer to it too.")
    served_model_name: Optional[Union[str, List[str]]] = Field(
        None, description="The name(s) OpenAI's routes answer to, as vLLM's option; the first is reported in answers "
        "and v1/models. Default: TorchServe's model name and handler.model_name. Another name gets 404.")
    max_length: Optional[int] = Field(None, ge=1, description="Upper bound on prompt + generated tokens.")
    max_new_tokens: int = Field(64, ge=1, description="Upper bound (and default) for generated tokens per request.")
    manual_seed: int = Field(42, description="Seed set identically on every rank.")
    dtype: Optional[DTypeName] = Field(
        None, description="Model dtype; default fp16 on GPU, fp32 on CPU; fp32, fp16, half and bf16 are read as their full names.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model folder; off by default.")
    max_request_bytes: int = Field(1_000_000, ge=1, description="Requests with a larger body get a 413.")
    chat_template: Optional[str] = Field(
        None, description="Jinja chat template for v1/chat/completions, where the tokenizer has none (or to replace it).")
    onednn_lm_head: bool = Field(
        True, description="CPU, float32, where ts_plugin's CPU kernels could not be built (no compiler): compute "
        "the output projection (lm_head) through oneDNN, up to twice as fast as the default path for a decode "
        "step's few rows on some hosts (custom, and pp's last stage). A head tied to the input embedding gets a copy "
        "of its weight (vocab x hidden x 4 bytes); an untied one is replaced. Where the kernels are built, their "
        "small_linear takes the head's decode rows instead, faster still and without a copy.")
    compile_step: bool = Field(
        False, description="custom and tp: compile the model's forward for the step loop with torch.compile "
        "(inductor), the paged attention, small_linear and tp's all-reduce as ops inside one graph. It fuses the "
        "small ops between the linears (0.86-0.91x a decode step's time on SmolLM2 on 2 CPUs, bench.compiled_step) "
        "and compiles at load, 30-140 s on 2 CPUs, which startupTimeout must cover. Warm-up steps are checked against "
        "the eager forward; a failure or difference runs the model eagerly, said in the log. pp and pptp stages run "
        "eagerly.")
    disable_any_whitespace: bool = Field(
        False, description="Structured output: JSON answers get no whitespace beyond what the grammar needs (vLLM's "
        "option). By default JSON's own free whitespace is allowed, which a small model may fill until max_tokens.")
    tool_call_parser: Optional[ToolCallParser] = Field(
        None, description="How OpenAI's tool_choice \"auto\" finds tool calls in this model's text, as vLLM's "
        "option names the model families' markups (hermes: Hermes, Qwen 2.5; llama3_json: Llama 3.1+; mistral). "
        "Without it, \"auto\" gets a 400; \"required\" and a named function need none (a grammar forces them).")
    steps_per_call: int = Field(
        1, ge=1, le=64, description="continuousBatching: decode steps between the points where new requests join "
        "(as vLLM's num-scheduler-steps), fewer once a request finishes. The steps run in a loop of their own, so "
        "the frontend's round trip is off their path either way, and pp's row groups (pippy.chunks) step on their "
        "own without waiting for each other; more only makes a new request wait up to that many steps to join.")
    max_num_batched_tokens: Optional[int] = Field(
        256, ge=16, description="Prompt and decode tokens one step computes at most (vLLM's name): each running "
        "request counts one, and a prompt longer than what is left is prefilled in chunks over several steps, "
        "so a long prompt delays the running requests' next tokens by one chunk at a time, not its whole "
        "prefill. null: every prompt is prefilled whole at once.")
    kv_cache_memory: Optional[ByteSize] = Field(
        ByteSize(4 << 30), description="Memory for keys and values on each rank, as bytes or with a unit (4GiB, "
        "512MB): a paged cache of 16-token blocks, allocated as blocks are used, up to this. Requests wait while it "
        "is full, the newest running request is preempted and recomputed later when the others need its blocks (as "
        "vLLM does), and a request whose prompt and max_new_tokens alone exceed it gets a 4xx. A rank holds its own "
        "layers and kv heads; no row is padded. The prefix cache's blocks are in it. null: room for batchSize "
        "requests of max_length (or the model's maximum positions).")
    enable_prefix_caching: bool = Field(
        True, description="Keep the KV blocks of prompts' full 16-token blocks registered, and start a later prompt "
        "that begins with the same blocks from them, reading them in place (vLLM's name and default). OpenAI's "
        "answers count the reused tokens in usage.prompt_tokens_details.cached_tokens.")
    prefix_cache_tokens: int = Field(
        8192, ge=16, description="Tokens of registered blocks the prefix cache keeps once no request holds them, "
        "least recently used freed first. They are blocks of the KV cache (kv_cache_memory), not a copy beside it.")
    # custom (Accelerate)
    device_map: Optional[Union[DeviceMapStrategy, Dict[str, Union[int, str]]]] = Field(
        None, description="auto|balanced|balanced_low_0|sequential or module -> device (custom only).")
    max_memory: Optional[Dict[Union[int, str], Union[int, str]]] = Field(
        None, description="Per GPU id, cpu and disk, e.g. {0: 10GiB, cpu: 30GiB} (custom only).")
    offload_folder: Optional[str] = Field(None, description="Disk offload folder inside the model folder (custom only).")
    offload_buffers: bool = False
    no_split_module_classes: Optional[List[str]] = None
    low_cpu_mem_usage: bool = True

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_canonical(cls, value: Any) -> Any:
        return _canonical_dtype(value)


class ModelConfig(_Section):
    """The whole model-config.yaml. Unknown top-level sections are kept for user handlers."""

    min_workers: int = Field(1, alias="minWorkers", description="0 becomes 1 in the frontend.")
    max_workers: int = Field(1, alias="maxWorkers", ge=0)
    batch_size: int = Field(1, alias="batchSize", ge=1)
    max_batch_delay: int = Field(100, alias="maxBatchDelay", ge=0, description="Milliseconds.")
    response_timeout: int = Field(120, alias="responseTimeout", gt=0, description="Seconds.")
    startup_timeout: int = Field(120, alias="startupTimeout", gt=0, description="Seconds.")
    device_type: Optional[DeviceType] = Field(None, alias="deviceType")
    device_ids: Optional[List[int]] = Field(None, alias="deviceIds", description="GPU ids for this model's workers.")
    parallel_type: Optional[str] = Field(
        None, alias="parallelType",
        description=f"One of {', '.join(PARALLEL_TYPES)} (the records in ts_plugin/config/parallel_types.py).")
    parallel_level: Optional[int] = Field(
        None, alias="parallelLevel", ge=1, description="GPUs per worker; mutually exclusive with torchrun.nproc-per-node.")
    torchrun: Optional[TorchrunConfig] = None
    max_retry_timeout_in_sec: int = Field(300, alias="maxRetryTimeoutInSec", ge=0)
    client_timeout_in_mills: int = Field(0, alias="clientTimeoutInMills", ge=0)
    job_queue_size: Optional[int] = Field(None, alias="jobQueueSize")
    use_job_ticket: bool = Field(False, alias="useJobTicket")
    sequence_max_idle_msec: int = Field(0, alias="sequenceMaxIdleMSec", ge=0)
    sequence_timeout_msec: int = Field(0, alias="sequenceTimeoutMSec", ge=0)
    max_sequence_job_queue_size: int = Field(1, alias="maxSequenceJobQueueSize", ge=1)
    max_num_sequence: int = Field(1, alias="maxNumSequence", ge=1)
    sequence_batching: bool = Field(False, alias="sequenceBatching")
    continuous_batching: bool = Field(False, alias="continuousBatching")
    async_communication: bool = Field(False, alias="asyncCommunication")
    use_venv: bool = Field(False, alias="useVenv")
    pippy: Optional[PippyConfig] = None
    deepspeed: Optional[DeepSpeedConfig] = None
    handler: HandlerConfig = Field(default_factory=HandlerConfig)

    @field_validator("device_type", mode="before")
    @classmethod
    def _case_insensitive(cls, value: Any) -> Any:
        return _lowercase(value)

    @field_validator("parallel_type", mode="before")
    @classmethod
    def _registered_parallel_type(cls, value: Any) -> Any:
        # checked against the registry at validation time, as a Literal would be (the same error type and text)
        value = _lowercase(value)
        if value is not None and value not in PARALLEL_TYPES:
            raise PydanticCustomError("literal_error", "Input should be {expected}",
                                      {"expected": _choices(PARALLEL_TYPES)})
        return value

    @field_validator("handler", mode="before")
    @classmethod
    def _empty_handler(cls, value: Any) -> Any:
        return {} if value is None else value  # `handler:` with every key commented out


def parse_device(value: Any) -> Optional[Union[int, str]]:
    """A device-map or max_memory device as Accelerate takes it: a GPU id (int), "cpu" or "disk"; "cuda:1", "1"
    and "cuda" mean GPU 1, 1 and 0. None where it is none of these."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("cpu", "disk"):
            return text
        match = re.fullmatch(r"(?:cuda:?)?(\d+)", text)
        if match:
            return int(match.group(1))
        if text == "cuda":
            return 0
    return None


def known_keys(model: type) -> List[str]:
    """The YAML spellings of a section's keys."""
    return [info.alias or name for name, info in model.model_fields.items()]


# Where the near-miss check looks for known spellings, by path prefix.
SECTIONS: Dict[tuple, type] = {
    (): ModelConfig,
    ("torchrun",): TorchrunConfig,
    ("pippy",): PippyConfig,
    ("deepspeed",): DeepSpeedConfig,
    ("deepspeed", "tensor_parallel"): TensorParallelConfig,
    ("handler",): HandlerConfig,
}


def _choices(values) -> str:
    quoted = [repr(v) for v in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def json_schema() -> Dict[str, Any]:
    """A JSON Schema of model-config.yaml for editors (yaml-language-server)."""
    schema = ModelConfig.model_json_schema(by_alias=True)
    for key, choices in (("parallelType", tuple(PARALLEL_TYPES)), ("deviceType", get_args(DeviceType))):
        # the frontend compares case-insensitively; JSON Schema has no flag for it, so spell it out
        pattern = "^(" + "|".join("".join(f"[{c.lower()}{c.upper()}]" for c in choice) for choice in choices) + ")$"
        schema["properties"][key] = {"anyOf": [{"type": "string", "pattern": pattern}, {"type": "null"}],
                                     "default": None, "title": schema["properties"][key].get("title", key)}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "TorchServe model-config.yaml (ts_plugin)"
    return schema
