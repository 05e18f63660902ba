"""Frozen, validated configuration dataclasses. No I/O happens here.

Loading a model's config from disk is `kvserve.model.loader.load_model_config`, which returns a
`ModelConfig`; everything here is plain data plus validation and derived properties.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the option and the problem."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer of the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or a dict in Hugging Face's `rope_scaling` shape ({"rope_type": "llama3" | "linear", ...}).
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q/k/v projections.
    # Token ids that end generation (eos, eot, ...), as declared by the checkpoint.
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


KV_CACHE_DTYPES = ("auto", "bfloat16", "float32")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size and how many blocks the pool holds.

    The pool is sized by exactly one of `num_blocks` or `memory_bytes`; with neither, the runner
    picks a default budget: on CUDA from the free GPU memory (`gpu_memory_utilization`), else
    `DEFAULT_KV_MEMORY_BYTES`.
    """

    block_size: int = 16
    num_blocks: int | None = None
    memory_bytes: int | None = None
    enable_prefix_caching: bool = True
    host_memory_bytes: int = 0          # --kv-host-memory: the host tier for evicted blocks (0: none)
    disk_dir: str | None = None         # --kv-disk-dir: the disk tier below the host tier (None: none)
    disk_num_blocks: int = 4096         # --kv-disk-blocks: files the disk tier keeps at most (LRU)
    pin_budget_fraction: float = 0.5    # --pin-budget: share of the pool cache checkpoints may hold
    # --kv-cache-dtype: auto = bf16 under a quantized fp32 model on CPU (half the bytes, twice the
    # tokens; read with fp32 math), else the model's dtype
    dtype: str = "auto"
    # --gpu-memory-utilization: on CUDA without a size given, the pool takes this share of the
    # GPU's memory, less what other processes hold, the weights and a profiled activation peak
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.dtype!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.memory_bytes is not None:
            raise ConfigError("give either --num-kv-blocks or --kv-cache-memory, not both")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"--num-kv-blocks must be at least 1, got {self.num_blocks}")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ConfigError(f"--kv-cache-memory must be positive, got {self.memory_bytes}")
        if self.host_memory_bytes < 0:
            raise ConfigError(f"--kv-host-memory must be 0 or more, got {self.host_memory_bytes}")
        if self.disk_dir is not None and not self.host_memory_bytes:
            raise ConfigError("--kv-disk-dir needs a host tier: the disk tier holds what the host tier evicts; "
                              "give --kv-host-memory too (e.g. --kv-host-memory 2GiB)")
        if self.disk_num_blocks < 1:
            raise ConfigError(f"--kv-disk-blocks must be at least 1, got {self.disk_num_blocks}")
        if not 0.0 <= self.pin_budget_fraction <= 1.0:
            raise ConfigError(f"--pin-budget must be between 0 and 1, got {self.pin_budget_fraction}")


DEFAULT_KV_MEMORY_BYTES = 1 << 30  # 1 GiB when neither --num-kv-blocks nor --kv-cache-memory is given


SCHEDULING_POLICIES = ("fcfs", "priority", "cache-aware")
PREEMPTION_MODES = ("auto", "swap", "recompute")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits.

    max_num_batched_tokens: the token budget of one step (prefill chunks + decodes).
    max_num_seqs: at most this many requests run at once.
    max_model_len: prompt + output tokens of one request; None means the model's context.
    policy: the waiting-queue ordering: "fcfs"; "priority" (lower `priority` values first, and a
        waiting request preempts a running one of lower priority); "cache-aware" (cached prefixes
        first, aged so that no request waits past `aging_factor` times its service time).
    preemption_mode: "auto" (swap or recompute, whichever costs less on this machine), "swap"
        (when the host tier has room), or "recompute".
    """

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int | None = None
    policy: str = "fcfs"
    # While foreground requests are around (and this long after), background work (batch jobs) is
    # cut so that a step takes at most this many times the fastest recent step; 0: never cut.
    background_step_factor: float = 2.0
    # While a tenant within its fair share has work (and interactive_linger_s after), the prompt
    # chunks of tenants over their share are cut so that a step takes at most this many
    # times the fastest recent step without them; 0: never cut.
    tenant_step_factor: float = 2.0
    interactive_linger_s: float = 2.0
    preemption_mode: str = "auto"
    aging_factor: float = 4.0

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"--max-num-batched-tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max-model-len must be at least 2, got {self.max_model_len}")
        if self.background_step_factor < 0 or self.interactive_linger_s < 0:
            raise ConfigError("--background-step-factor and the interactive linger must be 0 or more")
        if self.tenant_step_factor < 0:
            raise ConfigError(f"--tenant-step-factor must be 0 or more, got {self.tenant_step_factor}")
        if self.policy not in SCHEDULING_POLICIES:
            raise ConfigError(f"--scheduling-policy must be one of {', '.join(SCHEDULING_POLICIES)}; got {self.policy!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ConfigError(f"--preemption-mode must be one of {', '.join(PREEMPTION_MODES)}; "
                              f"got {self.preemption_mode!r}")
        if not self.aging_factor > 0:
            raise ConfigError(f"--aging-factor must be positive, got {self.aging_factor}")


DTYPES = ("auto", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")
QUANTIZATIONS = ("auto", "none", "int8", "int4")


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to build an engine. `model` is a GGUF path, a Hugging Face directory,
    "random:<preset>" for a randomly initialised model of a known shape (tests), or None for the
    embedded default model."""

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    attention_backend: str = "auto"   # auto: the C++ CPU kernel on CPU when it builds, triton on CUDA, else torch
    # weight-only: int8 (per-channel scales) or int4 (groups of 32, Q4_1 layout); auto: int4 on CPU when the
    # dtype is auto too (the speed default of `kvserve serve`), else none. The library keeps none: an engine
    # built in code computes what its dtype says unless it asks for more.
    quantization: str = "none"
    enforce_eager: bool = False       # CUDA: no graphs of decode steps (runner/cuda_graphs.py)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}; "
                              f"got {self.attention_backend!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}")

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


def parse_bytes(text: str) -> int:
    """'4GiB', '512MiB', '1.5G', '1000000' -> bytes. Raises ConfigError on anything else."""
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
             "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}
    s = text.strip().lower()
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):].strip()
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"cannot read a size from {text!r}; use e.g. 512MiB, 2GiB or a byte count") from None
    if unit not in units or value <= 0:
        raise ConfigError(f"cannot read a size from {text!r}; use e.g. 512MiB, 2GiB or a byte count")
    return int(value * units[unit])


@dataclass(frozen=True)
class ServerConfig:
    """HTTP server limits. Every limit is a flag of `kvserve serve` (see README)."""

    host: str = "127.0.0.1"
    port: int = 8000
    # Requests allowed to wait beyond the --max-num-seqs that run; past it: 429 + Retry-After.
    max_queued_requests: int = 256
    max_body_bytes: int = 4 << 20          # 413 past this, before the body is parsed
    max_prompt_tokens: int | None = None   # None: the model's context less one output token
    max_n: int = 8                         # choices per request
    cache_min_tokens: int = 1024           # a checkpoint's prefix shorter than this pins nothing
    retry_after_s: int = 1
    # max_tokens of a request that gives none (capped by the room the context leaves)
    max_tokens_default: int = 4096
    # Slow and hostile clients (docs/reliability.md):
    header_timeout_s: float = 10.0         # a request's headers must be in by then (slowloris), else 408
    body_timeout_s: float = 60.0           # ... and its body by then, else 408
    keep_alive_timeout_s: float = 5.0      # an idle keep-alive connection is closed after this
    max_header_bytes: int = 16384          # request line + headers; past it: 400 and close
    stream_idle_timeout_s: float = 30.0    # a stream whose client reads nothing for this long is aborted
    ws_max_requests: int = 32              # requests in flight on one WebSocket; past it: 429 frame
    shutdown_timeout_s: float = 30.0       # SIGTERM: in-flight streams may finish within this
    metrics_auth: bool = False             # /metrics needs an admin key (with --api-keys)
    # Batch jobs (kvserve/batch/): off without a state directory
    state_dir: str | None = None           # SQLite and file contents of batch jobs
    max_batch_file_bytes: int = 200 << 20  # an uploaded batch file (or a message batch body) at most this
    max_batch_lines: int = 50_000          # requests per batch
    batch_concurrency: int | None = None   # batch lines in flight at once; None: the engine's max_num_seqs
    # Routers (kvserve/routing/): RouterConfigs, and cost weights by model name (default: parameters / 1e9)
    routers: tuple = ()
    cost_weights: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.max_queued_requests < 0:
            raise ConfigError(f"--max-queued-requests must be 0 or more, got {self.max_queued_requests}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes must be at least 1024, got {self.max_body_bytes}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"--max-prompt-tokens must be positive, got {self.max_prompt_tokens}")
        if self.max_n < 1:
            raise ConfigError(f"--max-n must be at least 1, got {self.max_n}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s", "stream_idle_timeout_s"):
            if getattr(self, name) <= 0:
                flag = "--" + name.removesuffix("_s").replace("_", "-")
                raise ConfigError(f"{flag} must be positive, got {getattr(self, name)}")
        if self.shutdown_timeout_s < 0:
            raise ConfigError(f"--shutdown-timeout must be 0 or more, got {self.shutdown_timeout_s}")
        if self.max_header_bytes < 1024:
            raise ConfigError(f"--max-header-bytes must be at least 1024, got {self.max_header_bytes}")
        if self.max_batch_file_bytes < 1024:
            raise ConfigError(f"--max-batch-file-bytes must be at least 1024, got {self.max_batch_file_bytes}")
        if self.max_batch_lines < 1:
            raise ConfigError(f"--max-batch-lines must be at least 1, got {self.max_batch_lines}")
        if self.batch_concurrency is not None and self.batch_concurrency < 1:
            raise ConfigError(f"--batch-concurrency must be at least 1, got {self.batch_concurrency}")
        if self.ws_max_requests < 1:
            raise ConfigError(f"--ws-max-requests must be at least 1, got {self.ws_max_requests}")
        if self.max_tokens_default < 1:
            raise ConfigError(f"--max-tokens-default must be at least 1, got {self.max_tokens_default}")
        if self.cache_min_tokens < 0:
            raise ConfigError(f"--cache-min-tokens must be 0 or more, got {self.cache_min_tokens}")
