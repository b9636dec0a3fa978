"""Typed settings of ``loramux serve``: flags, or ``LORAMUX_*`` environment variables.

This module imports nothing heavy, so ``loramux serve --help`` answers at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from loramux.logs import LogSettings
from loramux.tokens import Token

GiB = 1024**3
MiB = 1024**2


class ServeSettings(LogSettings, BaseSettings):
    """One inference server: one base model, many tenants' adapters."""

    model_config = SettingsConfigDict(env_prefix="LORAMUX_", extra="forbid")

    # --- model
    model: Path | None = Field(
        None, description="Local HF checkpoint directory. Default: the embedded SmolLM2-135M."
    )
    served_model_name: str | None = Field(None, description="Name the base is served under.")
    quantization: Literal["auto", "nf4", "bf16", "fp16", "none"] = Field(
        "auto", description="Weights: nf4 (4-bit), bf16, fp16 or none (fp32). auto = the "
        "fastest that fits in memory on this device (NF4 on CPUs with native bf16, fp32 on "
        "CPUs without, half precision on CUDA).",
    )
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="What NF4 weights dequantize to and matmuls run in. auto = bf16 "
        "on CPUs with AVX512-BF16/AMX and on CUDA with bf16, fp16 on older CUDA, else fp32.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: Path | None = Field(None, description="Where the converted default model lives.")
    merge_adapter: Path | None = Field(
        None,
        description="Serve this one adapter merged into the base (hot-tenant deployments). "
        "Its tenant@version comes from --merge-adapter-ref or the <tenant>/<version> path.",
    )
    merge_adapter_ref: str | None = None

    # --- HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    admin_token: str | None = Field(None, description="Bearer token for /admin routes.")
    admin_token_file: Path | None = Field(
        None, description="File holding the admin token (a mounted Secret); re-read when it "
        "changes, so a rotated token takes effect without a restart.")
    admin_port: int | None = Field(
        None, ge=0, le=65535, description="Serve /admin/* only on admin_host:admin_port (the "
        "public port answers 404 for /admin). Unset: /admin is on the public port.")
    admin_host: str = Field("127.0.0.1", description="Interface of the admin port.")
    max_body_bytes: int = Field(1 * MiB, ge=1024)
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve the per-tenant metrics at /metrics on "
        "metrics_host:metrics_port; the public port's /metrics then shows them summed over "
        "tenants. Unset: per-tenant metrics are at /admin/metrics.")
    metrics_host: str = Field("127.0.0.1", description="Interface of the metrics port.")
    metrics_tenant_histograms: int = Field(
        64, ge=0, description="Per-tenant latency histograms (time to first token, request "
        "latency) are kept for at most this many tenants, the most recently active; the "
        "others' observations are in tenant=\"_other\", so totals stay whole. Per-tenant "
        "counters are not bounded. 0 = only _other.")

    # --- access (issue 16)
    auth: Literal["keys", "none"] = Field(
        "keys", description="keys = every generation and /v1/models call needs "
        "'Authorization: Bearer <key>' whose hash grants the model asked for (from "
        "--access-file and the admin API); none = anyone may call anything (local use and "
        "the demo only; logged loudly).")
    access_file: Path | None = Field(
        None, description="JSON key grants and per-tenant access (loramux.contracts."
        "AccessFile): hashes only, never keys. Re-read when it changes.")

    # --- fair shares and per-tenant limits (issue 16)
    admission: Literal["fair", "fifo"] = Field(
        "fair", description="fair = token-fair admission across tenants (virtual token "
        "counters, weighted); fifo = arrival order (the old behaviour, for comparison).")
    prompt_token_cost: float = Field(
        1.0, gt=0, description="Weight of a prompt token in a tenant's fair-share service.")
    output_token_cost: float = Field(
        2.0, gt=0, description="Weight of a generated token in a tenant's fair-share service "
        "(a decode step costs more per token than a prefill).")
    tenant_max_concurrent: int | None = Field(
        None, ge=1, description="Default per-tenant cap on requests waiting or running.")
    tenant_tokens_per_minute: int | None = Field(
        None, ge=1, description="Default per-tenant cap on prompt+generated tokens per 60 s.")
    tenant_max_queued: int | None = Field(
        None, ge=1, description="Default per-tenant cap on requests waiting for a row.")

    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads of the engine's forward passes (default: all)."
    )

    # --- limits
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_queue: int = Field(256, ge=1)
    max_prompt_tokens: int = Field(2048, ge=1)
    max_new_tokens_limit: int = Field(2048, ge=1)
    default_max_new_tokens: int = Field(128, ge=1)
    max_prefill_tokens: int = Field(4096, ge=1, description="Prompt tokens prefilled per step.")
    prefill_chunk_tokens: int = Field(
        512, ge=0, description="While rows decode, prefill a newly admitted group of more "
        "than this many (padded) prompt tokens in chunks of about this many, one per decode "
        "step, so long prompts do not stall every running stream; requests that fit in half "
        "of it are prefilled beside the chunk. 0 = always one pass. On a GPU, prefill is "
        "cheap per token: a few thousand suits it better.")
    prefetch_adapters: bool = Field(
        False, description="Start loading waiting requests' adapters (disk reads on a loader "
        "thread; free device slots only, nothing evicted) before their turn. Off by default: "
        "no benchmark here has shown it to pay (docs/benchmarks.md, 'Prefetch'); it may where "
        "adapters come from a slow volume.")
    max_queue_wait_s: float | None = Field(
        None, gt=0, description="Bound on a request's wait for a row, to keep time to first "
        "token low under overload: a request whose estimated wait (requests ahead of it over "
        "the recent admission rate) exceeds it is refused at once with 429 and Retry-After, "
        "and one that still waits longer is ended with 429. Default: no bound (requests "
        "wait up to request_timeout_s, within max_queue).")
    request_timeout_s: float = Field(300.0, gt=0)
    drain_timeout_s: float = Field(60.0, gt=0, description="Max wait of DELETE for in-flight.")
    route_retry_s: float = Field(
        5.0, gt=0, description="After a routed (hot) tenant's dedicated deployment fails, "
                               "serve it locally for this long before trying it again.")
    peer_failover_s: float = Field(
        30.0, ge=0, description="Scale-out: when the placement table knows a tenant but no "
        "holder can answer (all failed, none Ready yet, being re-placed), hold the request "
        "up to this long for a new table (or a holder's breaker to expire) and retry, "
        "instead of a 503 at once. 0 = no wait. Not for a tenant whose every placement "
        "Failed: that 503 is immediate. At most max_queue requests wait at once.")
    peer_connect_timeout_s: float = Field(
        1.0, gt=0, description="Scale-out: connect timeout to a peer holder (a pod IP in the "
        "cluster answers a connect in milliseconds; a lost node never does).")
    peer_hang_timeout_s: float = Field(
        5.0, gt=0, description="Scale-out: a peer holder that has sent no response headers "
        "for this long is asked GET /healthz; no answer to that within this long either and "
        "it is deemed hung and skipped. A holder that answers the probe keeps the request "
        "(a non-streaming answer legitimately comes only after the whole generation).")
    engine_stall_timeout_s: float = Field(
        60.0, gt=0, description="Liveness: if the engine completes no step for this long while "
        "requests run or wait, /healthz and /readyz fail and new requests get 503 at once.")
    stream_send_timeout_s: float = Field(
        30.0, gt=0, description="A stream whose client reads nothing for this long (a send "
        "blocks) is ended and its row freed; forwarded streams too.")

    # --- adapters and cache tiers
    lora_backend: Literal["batched", "peft"] = Field(
        "batched",
        description="batched = loramux's gathered-matmul layers (cost flat in distinct "
        "tenants); peft = PEFT's mixed-batch forward (reference implementation).",
    )
    lora_dtype: Literal["auto", "fp32", "compute"] = Field(
        "auto",
        description="dtype of the batched LoRA stacks and their two small matmuls: fp32, or "
        "the model's compute dtype (bf16 halves the bytes a decode step reads per adapter). "
        "auto = compute (docs/benchmarks.md, 'LoRA stacks in the compute dtype').",
    )
    lora_kernel: Literal["auto", "off"] = Field(
        "auto",
        description="auto = on a CPU, decode steps of distinct tenants run loramux's CPU "
        "kernel, which reads each row's adapter where it lies (built once per machine with "
        "the C++ compiler torch finds; while it builds, and where it cannot, the plain-torch "
        "path runs); off = the plain-torch path always.")
    cpu_linear: Literal["auto", "onednn", "torch"] = Field(
        "auto",
        description="auto = on a CPU, the base's fp32 linear layers, and its bf16 ones on a "
        "CPU with native bf16, run through oneDNN on weights packed once at start-up (faster "
        "than torch's F.linear for decode steps; costs a second copy of those weights in "
        "memory), where a start-up probe shows it works; onednn = also bf16 weights where "
        "bf16 is emulated, and fail start-up where it cannot run; torch = torch's F.linear.")
    kernel_dir: Path | None = Field(
        None, description="Where the CPU kernel is built and looked up (default "
        "~/.cache/loramux/kernels). The CPU image ships it prebuilt.")
    merge_uniform_batches: bool = Field(
        True, description="When every row of a forward pass uses one adapter, run it on the "
        "base weights with that adapter merged in (one matmul per layer, as the base alone) "
        "instead of base + LoRA pair. Plain float bases only (not NF4/int8). Costs one copy "
        "of the adapted layers' weights, and one merge (about one decode step) whenever the "
        "merged adapter changes.")
    max_lora_rank: int = Field(64, ge=1)
    device_adapter_slots: int = Field(32, ge=1)
    device_cache_bytes: int = Field(1 * GiB, ge=1)
    host_cache_bytes: int = Field(4 * GiB, ge=0)
    allow_pickle_adapters: bool = Field(
        False, description="Allow adapter_model.bin (pickle). Never for untrusted sources."
    )
    unknown_tenant: Literal["reject", "base"] = Field(
        "reject", description="reject = 404; base = serve the base model, flagged adapter: null."
    )
    adapter: list[str] = Field(
        default_factory=list,
        description="Preload tenant@version=PATH (repeatable); the last version given is active.",
    )
    adapter_root: Path | None = Field(
        None, description="If set, the admin API loads adapters only from inside this folder."
    )
    pin: list[str] = Field(default_factory=list, description="tenant@version to pin (repeatable).")

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("default_max_new_tokens exceeds max_new_tokens_limit")
        if (self.admin_port is not None and self.admin_port != 0
                and self.admin_port == self.port):
            raise ValueError("admin_port must differ from port")
        ports = [p for p in (self.port, self.admin_port, self.metrics_port) if p]
        if len(ports) != len(set(ports)):
            raise ValueError("port, admin_port and metrics_port must differ")
        return self

    def resolved_admin_token(self) -> Token:
        """The admin token; ``.current()`` follows a rotated token file (None: no token)."""
        return Token(self.admin_token, self.admin_token_file)
