"""ModelRunner: owns device, dtype, model, KV tensors, attention backend and sampler.
`execute(plan)` runs one forward pass and samples; it keeps no scheduling state beyond each
request's seeded random generator."""

from __future__ import annotations

import logging

import torch

from kvserve import cpu_features
from kvserve.attention.torch_ref import TorchPagedAttention
from kvserve.config import DEFAULT_KV_MEMORY_BYTES, CacheConfig, ModelConfig
from kvserve.model.llama import LlamaForCausalLM
from kvserve.runner.inputs import prepare_inputs
from kvserve.runner.kv_files import KVBlockFiles
from kvserve.runner.sampler import Sampler
from kvserve.sampling import SamplingParams
from kvserve.kv.manager import SwapPlan
from kvserve.sched.cost import PreemptionCosts
from kvserve.sched.plan import EMPTY_MODEL_OUTPUT, ModelOutput, ScheduledChunk, SchedulerOutput

log = logging.getLogger(__name__)
# The one line per model that `kvserve` prints at start-up whatever the log level (cli.main): the
# dtype, quantization, KV dtype and CPU kernel level in use.
startup_log = logging.getLogger("kvserve.startup")

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class KVTransferError(RuntimeError):
    """A copy between the KV pool and the host or disk tier failed. The books already say the
    copy happened, so no request's KV can be trusted any more: the engine cannot go on."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto → bf16 on CUDA and on CPUs with AVX512-BF16, else fp32."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" or cpu_features.native_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_quantization(name: str, dtype_name: str, device: torch.device, attention: str = "auto") -> str:
    """auto → int4 on CPU when the dtype is auto as well and kvserve's C++ kernels build here and
    are used (`--attention-backend` auto or cpu: torch's reference path would run int4 through its
    widened weights, with 4-bit numerics and no speed), else none. Measured on both CPU kinds
    (docs/speed-notes.md): int4 (4-bit weights, int8 activations, integer dot products) decodes one
    stream ~2× faster than bf16 on an AVX512-BF16 CPU, and on an AVX2 one runs 2.3–5.8× faster than
    fp32 at every batch size (its int4 GEMM); perplexity stays within 1% of fp32. An explicit --dtype asks
    for those numerics: no quantization then."""
    if name != "auto":
        return name
    if device.type != "cpu" or dtype_name != "auto" or attention not in ("auto", "cpu"):
        return "none"
    from kvserve.attention import cpu_kernels

    return "int4" if cpu_kernels.load() is not None else "none"


def resolve_kv_dtype(name: str, dtype: torch.dtype, quantization: str, device: torch.device) -> torch.dtype:
    """auto → bf16 under a quantized fp32 model on CPU, else the model's dtype. Measured on an AVX2
    CPU (docs/speed-notes.md): the decode kernel reads a bf16 cache with fp32 math faster than an
    fp32 one, and the pool holds twice the tokens; an unquantized fp32 model keeps its exact fp32
    cache (the one compared with transformers token for token)."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu" and dtype == torch.float32 and quantization != "none":
        return torch.bfloat16
    return dtype


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * config.num_layers * block_size * config.kv_size * dtype.itemsize


def gpu_kv_budget(total: int, free: int, reserved: int, allocated: int, activation_peak: int,
                  utilization: float) -> int:
    """Bytes the KV pool may take on a GPU of `total` bytes with `free` free: `utilization` of it,
    less what other processes hold (what is neither free nor reserved by this one), this
    process's tensors (the weights) and its activation peak; 0 when nothing is left."""
    others = max(0, total - free - reserved)
    return max(0, int(utilization * total) - others - allocated - activation_peak)


def num_kv_blocks(cache: CacheConfig, config: ModelConfig, dtype: torch.dtype) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    budget = cache.memory_bytes or DEFAULT_KV_MEMORY_BYTES
    num_blocks = budget // kv_bytes_per_block(config, cache.block_size, dtype)
    if num_blocks < 1:
        raise ValueError(f"--kv-cache-memory {budget} bytes holds no block of "
                         f"{kv_bytes_per_block(config, cache.block_size, dtype)} bytes")
    return num_blocks


def make_attention_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """auto → the C++ CPU decode kernel on CPU when it builds here; on CUDA the Triton kernels when
    triton is importable and they pass a start-up check against the reference; else the reference.
    The reference attends in fp32 on CPU: torch's CPU SDPA is much slower in bf16 (benchmarks.md)."""
    if name in ("auto", "cpu") and device.type == "cpu":
        from kvserve.attention import cpu_kernels
        from kvserve.attention.cpu import CpuPagedAttention

        kernels = cpu_kernels.load()
        if kernels is not None:
            return CpuPagedAttention(kernels)
        if name == "cpu":
            raise ValueError("--attention-backend cpu: the C++ kernel could not be built here (see the log); "
                             "use --attention-backend torch")
    elif name == "cpu":
        raise ValueError(f"--attention-backend cpu needs --device cpu, not {device.type}")
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        from kvserve.attention import triton_backend

        if not triton_backend.available(device):
            if name == "triton":
                raise ValueError("--attention-backend triton needs the triton package and a CUDA device "
                                 "(on a CPU only under TRITON_INTERPRET=1, for tests)")
        else:
            problem = triton_backend.self_check(device, dtype) if name == "auto" else None
            if problem is None:
                return triton_backend.TritonPagedAttention(device)
            log.warning("the triton attention backend failed its start-up check (%s); using the torch "
                        "reference", problem)
    return TorchPagedAttention(torch.float32 if device.type == "cpu" else None)


class ModelRunner:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], cache: CacheConfig,
                 dtype: torch.dtype, device: torch.device, seed: int = 0, attention: str = "auto",
                 quantization: str = "none", max_num_seqs: int = 64, max_model_len: int | None = None,
                 enforce_eager: bool = False, max_num_batched_tokens: int = 512):
        """On CUDA with the triton backend, all-decode steps of up to `max_num_seqs` rows replay
        CUDA graphs captured here for contexts up to `max_model_len` (runner/cuda_graphs.py),
        unless `enforce_eager`."""
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = cache.block_size
        self.backend = make_attention_backend(attention, device, dtype)
        if self.backend.name == "triton":   # eager decode steps split their keys as the CUDA graphs do
            self.backend.decode_split_len = max_model_len or config.max_position_embeddings
        with torch.device("meta"):
            model = LlamaForCausalLM(config, self.backend)
        model = model.to_empty(device=device)
        model.model.rotary.build_tables(device)
        model.load_weights(weights, dtype=self.weights_dtype(dtype, quantization))
        if quantization != "none":
            self._quantize(model, quantization, dtype, device)     # from the fp32 weights
        for param in model.parameters():
            param.data = param.data.to(device=device, dtype=dtype)
        if device.type == "cpu" and dtype == torch.bfloat16:
            from kvserve.model.packed import prepack_linears

            log.info("bf16 weights prepacked for oneDNN: %d linear layers", prepack_linears(model))
        kernels = getattr(self.backend, "kernels", None)     # the C++ CPU kernels, when they built
        if kernels is not None and (dtype == torch.bfloat16 or quantization != "none"):
            model.use_fused_kernels(kernels)     # unquantized fp32 keeps the torch spec, op for op
            from kvserve.model import quant

            if dtype == torch.float32 and cpu_features.isa() != "portable":
                log.info("integer GEMMs at every row count: %d int4 and %d int8 fp32 linear layers",
                         quant.use_int4_gemm(model), quant.use_int8_gemm(model))
            if quantization != "none":
                log.info("quantized weights gathered into one buffer: %.0f MB",
                         quant.gather_quantized_weights(model) / 1e6)
        if device.type == "cuda" and dtype == torch.bfloat16 and self.backend.name == "triton":
            from kvserve.model.triton_ops import TritonFusedOps   # fp32 keeps the torch spec, op for op

            model.use_fused_kernels(TritonFusedOps())
        self.model = model.eval()
        self.kv_dtype = resolve_kv_dtype(cache.dtype, dtype, quantization, device)
        if device.type == "cuda" and cache.num_blocks is None and cache.memory_bytes is None:
            self.num_blocks = self._blocks_from_gpu_memory(cache, max_num_batched_tokens, max_num_seqs)
        else:
            self.num_blocks = num_kv_blocks(cache, config, self.kv_dtype)
        self.kv_caches = self._new_kv_caches(self.num_blocks)
        shape = self.kv_caches[0][0].shape
        # The host tier: a separate bounded store in host memory (pinned on CUDA for fast copies).
        self.num_host_blocks = cache.host_memory_bytes // kv_bytes_per_block(config, cache.block_size, self.kv_dtype)
        host_shape = (self.num_host_blocks, *shape[1:])
        pin = device.type == "cuda"
        self.host_caches = [(torch.zeros(host_shape, dtype=self.kv_dtype, pin_memory=pin),
                             torch.zeros(host_shape, dtype=self.kv_dtype, pin_memory=pin))
                            for _ in range(config.num_layers)] if self.num_host_blocks else []
        # The disk tier below it (only below a host tier): one file per block, old files cleared.
        self.num_disk_blocks = cache.disk_num_blocks if cache.disk_dir and self.num_host_blocks else 0
        self.disk_files = (KVBlockFiles(cache.disk_dir, (config.num_layers, 2, *shape[1:]), self.kv_dtype)
                           if self.num_disk_blocks else None)
        self.sampler = Sampler(seed)
        self._generators: dict[str, torch.Generator] = {}
        self.warm_up()
        self.graphs = None
        if device.type == "cuda" and self.backend.name == "triton" and not enforce_eager:
            self._capture_graphs(max_num_seqs, max_model_len or config.max_position_embeddings)
        kernels = "" if device.type != "cpu" else f"; CPU kernels: {cpu_features.isa()}"
        startup_log.info("model on %s in %s (quantization: %s%s); KV cache %d blocks of %d tokens in %s", device,
                         str(dtype).removeprefix("torch."), quantization, kernels, self.num_blocks, self.block_size,
                         str(self.kv_dtype).removeprefix("torch."))

    @staticmethod
    def weights_dtype(dtype: torch.dtype, quantization: str) -> torch.dtype:
        """The dtype weights should arrive in: fp32 for quantization (it reads them), else `dtype`."""
        return dtype if quantization == "none" else torch.float32

    @staticmethod
    def _quantize(model: LlamaForCausalLM, quantization: str, dtype: torch.dtype, device: torch.device) -> None:
        if device.type != "cpu":
            raise ValueError(f"--quantization {quantization} runs on CPU; the device is {device.type}")
        from kvserve.model import quant

        if quantization == "int8":
            log.info("int8 weight-only quantization: %d linear layers (the LM head stays unquantized)",
                     quant.quantize_int8(model, dtype, keep=(model.lm_head,)))
        else:
            log.info("int4 weight-only quantization: %d linear layers in int4 (%d of them exactly the "
                     "checkpoint's own 4-bit groups), %d in int8 (the LM head; shapes the int4 kernel does "
                     "not take)", *quant.quantize_int4(model, dtype, int8_modules=(model.lm_head,)))

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        for request_id in plan.finished_request_ids:
            self._generators.pop(request_id, None)
        try:
            self._swap(plan.swaps)
        except Exception as error:
            raise KVTransferError(f"a KV copy between tiers failed: {error!r}") from error
        if not plan.chunks:
            return EMPTY_MODEL_OUTPUT
        if self.graphs is not None and all(c.num_tokens == 1 and c.samples for c in plan.chunks):
            hidden = self.graphs.run([c.token_ids[0] for c in plan.chunks], [c.start_position for c in plan.chunks],
                                     [c.block_ids for c in plan.chunks])
            if hidden is not None:   # every row samples: the rows are the logits rows
                return self._sample(self.model.compute_logits(hidden), tuple(c.request_id for c in plan.chunks),
                                    tuple(c.sampling_params for c in plan.chunks))
        inputs = prepare_inputs(plan, self.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
        if not inputs.sampling_request_ids:
            return EMPTY_MODEL_OUTPUT
        logits = self.model.compute_logits(hidden[inputs.logits_indices])      # [num_sampling, vocab]
        return self._sample(logits, inputs.sampling_request_ids, inputs.sampling_params)

    def _sample(self, logits: torch.Tensor, ids: tuple[str, ...], params: tuple) -> ModelOutput:
        generators = [self._generator(rid, p) for rid, p in zip(ids, params)]
        sampled = self.sampler(logits, params, generators)
        return ModelOutput(dict(zip(ids, sampled.token_ids)),
                           {rid: lp for rid, lp in zip(ids, sampled.logprobs) if lp is not None})

    def _blocks_from_gpu_memory(self, cache: CacheConfig, max_tokens: int, max_seqs: int) -> int:
        """The pool's blocks on CUDA: the largest step's activation peak is measured first (a
        prefill of `max_tokens` tokens through a private cache, the LM head on `max_seqs` rows),
        then the pool takes what --gpu-memory-utilization leaves (gpu_kv_budget)."""
        per_block = kv_bytes_per_block(self.config, self.block_size, self.kv_dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        max_tokens = min(max_tokens, self.config.max_position_embeddings)   # one sequence: its positions exist
        blocks = -(-max_tokens // self.block_size)
        caches = self._new_kv_caches(blocks)
        chunk = ScheduledChunk("profile", tuple(i % self.config.vocab_size for i in range(max_tokens)), 0,
                               tuple(range(blocks)), False, SamplingParams())
        with torch.inference_mode():
            inputs = prepare_inputs(SchedulerOutput((chunk,)), self.block_size, self.device)
            hidden = self.model(inputs.input_ids, inputs.positions, caches, inputs.metadata)
            self.model.compute_logits(hidden[-min(max_seqs, max_tokens):]).float()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base - blocks * per_block
        del caches, inputs, hidden
        free, total = torch.cuda.mem_get_info(self.device)
        budget = gpu_kv_budget(total, free, torch.cuda.memory_reserved(self.device), torch.cuda.memory_allocated(
            self.device), peak, cache.gpu_memory_utilization)
        if budget < per_block:
            raise ValueError(f"--gpu-memory-utilization {cache.gpu_memory_utilization} leaves no room for a KV "
                             f"block after the weights and a {peak / 1e9:.2f} GB activation peak; raise it, lower "
                             "--max-num-batched-tokens, or give --kv-cache-memory")
        startup_log.info("KV pool from GPU memory: %.1f GB (%.0f%% of %.1f GB, less %.2f GB of weights and a "
                         "%.2f GB activation peak)", budget / 1e9, 100 * cache.gpu_memory_utilization, total / 1e9,
                         torch.cuda.memory_allocated(self.device) / 1e9, peak / 1e9)
        return budget // per_block

    def _capture_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        from kvserve.runner.cuda_graphs import DecodeGraphs

        graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs, max_model_len, self.block_size, self.device)
        try:
            graphs.capture()
        except Exception as error:   # a model or kernel a graph cannot hold: eager, said once
            log.warning("CUDA graph capture failed (%s: %s); decode steps run eagerly", type(error).__name__, error)
            torch.cuda.synchronize()
            return
        self.graphs = graphs

    def _new_kv_caches(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed (K, V) per layer, each [num_blocks, block_size, kv_heads, head_dim]."""
        shape = (num_blocks, self.block_size, self.config.num_kv_heads, self.config.head_dim)
        return [(torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                 torch.zeros(shape, dtype=self.kv_dtype, device=self.device)) for _ in range(self.config.num_layers)]

    def warm_up(self) -> None:
        """Run a prefill chunk and a few one-token steps through a private cache before serving, so
        the first request does not pay the first-call costs (kernel selection, allocator growth):
        measured, the first 1,100-token prompt after start took 2.9 s instead of ~1.1 s."""
        n = min(520, self.config.max_position_embeddings)
        ids = [i % self.config.vocab_size for i in range(n)]
        self.score(ids, chunk_size=512)
        self.score(ids[:8], chunk_size=1)

    @torch.inference_mode()
    def weight_bytes(self) -> int:
        """Bytes of the tensors the model holds (tied ones once): what a decode step reads at the
        least (a bench's physical floor)."""
        seen: set[int] = set()
        total = 0
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
        return total

    def measure_costs(self) -> PreemptionCosts:
        """What preemption costs each way on this machine (see sched/cost.py), timed once after the
        warm-up: a 256-token prefill and one-token decode steps through a private cache, and a
        copy of 16 blocks to host memory and back, the way a swap copies them (~0.1-1 s)."""
        import time

        def synchronize() -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        n = min(256, self.config.max_position_embeddings - 4)
        bs = self.block_size
        num_blocks = -(-(n + 4) // bs)
        caches = self._new_kv_caches(num_blocks)
        ids = tuple(i % self.config.vocab_size for i in range(n + 4))

        def forward(start: int, end: int) -> float:
            chunk = ScheduledChunk("measure", ids[start:end], start, tuple(range(num_blocks)), False, SamplingParams())
            inputs = prepare_inputs(SchedulerOutput((chunk,)), bs, self.device)
            synchronize()
            started = time.perf_counter()
            self.model(inputs.input_ids, inputs.positions, caches, inputs.metadata)
            synchronize()
            return time.perf_counter() - started

        prefill_s = forward(0, n)
        decode_s = min(forward(n + i, n + i + 1) for i in range(3))
        count = min(16, num_blocks)
        k = caches[0][0][:count]
        host = torch.empty(k.shape, dtype=k.dtype, pin_memory=self.device.type == "cuda")
        synchronize()
        started = time.perf_counter()
        for key, value in caches:
            host.copy_(key[:count])
            key[:count].copy_(host, non_blocking=True)
            host.copy_(value[:count])
            value[:count].copy_(host, non_blocking=True)
        synchronize()
        copy_s = max(time.perf_counter() - started, 1e-6)
        per_block = kv_bytes_per_block(self.config, bs, self.kv_dtype)
        costs = PreemptionCosts(copy_bytes_per_s=2 * count * per_block / copy_s,
                                prefill_tokens_per_s=n / max(prefill_s, 1e-6),
                                decode_step_s=max(decode_s, 1e-6), bytes_per_block=per_block)
        log.info("measured: prefill %.0f tokens/s, decode step %.1f ms, KV copy %.2f GB/s (%d bytes per block)",
                 costs.prefill_tokens_per_s, 1e3 * costs.decode_step_s, costs.copy_bytes_per_s / 1e9, per_block)
        return costs

    @torch.inference_mode()
    def score(self, token_ids: list[int], chunk_size: int = 512) -> torch.Tensor:
        """Log-probability of each token given the ones before it ([len - 1] fp32), for perplexity.
        Runs the text as one sequence in chunks through a private KV cache, so it never touches
        the engine's blocks."""
        n, bs = len(token_ids), self.block_size
        num_blocks = -(-n // bs)
        caches = self._new_kv_caches(num_blocks)
        targets = torch.tensor(token_ids[1:], device=self.device)
        scores = []
        for start in range(0, n - 1, chunk_size):
            end = min(start + chunk_size, n - 1)
            chunk = ScheduledChunk("score", tuple(token_ids[start:end]), start, tuple(range(num_blocks)), False,
                                   SamplingParams())
            inputs = prepare_inputs(SchedulerOutput((chunk,)), bs, self.device)
            hidden = self.model(inputs.input_ids, inputs.positions, caches, inputs.metadata)
            logprobs = torch.log_softmax(self.model.compute_logits(hidden).float(), dim=-1)
            scores.append(logprobs.gather(1, targets[start:end, None]).squeeze(1))
        return torch.cat(scores)

    def _swap(self, swaps: SwapPlan) -> None:
        """Run the step's copies in SwapPlan's order: disk drops, host → disk (before a swap-out
        reuses the slot), device → host (before a hit refills the block), then hits back in."""
        for name in swaps.disk_drop:
            self.disk_files.drop(name)
        for slot, name in swaps.host_to_disk:
            self.disk_files.write(name, torch.stack([torch.stack((hk[slot], hv[slot])) for hk, hv in self.host_caches]))
        if swaps.swap_out:
            blocks, slots = (torch.tensor(x) for x in zip(*swaps.swap_out))
            for (k, v), (hk, hv) in zip(self.kv_caches, self.host_caches):
                hk[slots] = k[blocks.to(k.device)].to("cpu")
                hv[slots] = v[blocks.to(v.device)].to("cpu")
        if swaps.swap_in:
            slots, blocks = (torch.tensor(x) for x in zip(*swaps.swap_in))
            for (k, v), (hk, hv) in zip(self.kv_caches, self.host_caches):
                k[blocks.to(k.device)] = hk[slots].to(k.device, non_blocking=True)
                v[blocks.to(v.device)] = hv[slots].to(v.device, non_blocking=True)
        if swaps.disk_to_device:
            names, blocks = zip(*swaps.disk_to_device)
            data = torch.stack([self.disk_files.read(name) for name in names])   # [n, layers, 2, *block]
            blocks = torch.tensor(blocks, device=self.device)
            for layer, (k, v) in enumerate(self.kv_caches):
                k[blocks] = data[:, layer, 0].to(k.device)
                v[blocks] = data[:, layer, 1].to(v.device)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None or params.greedy:
            return None
        generator = self._generators.get(request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
            self._generators[request_id] = generator
        return generator
