"""Assembling one server process from its settings, and running it under uvicorn.

With ``--admin-port`` the one app listens on two sockets of one uvicorn server: the public
port and the admin port (``admin_host``, loopback by default). One app, one lifespan, one
engine and one graceful shutdown; :class:`~.app.AdminPortGate` routes by the local port a
request arrived on (``/admin/*`` only on the admin port). A second uvicorn server would need
a second app and lifespan sharing the Runtime, and two shutdown paths to keep in step.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramux import __version__
from loramux.contracts import TenantAccess
from loramux.names import AdapterRef, InvalidName
from loramux.tokens import Token

from .access import AccessControl
from .adapter_cache import AdapterCache
from .adapters import AdapterRejected, BaseFacts, read_adapter
from .cpu_linear import CpuLinearState, pack_linears
from .engine import Engine, confine_torch_threads
from .fairness import TenantPolicy
from .lora_backend import BatchedLoraBackend, LoraBackend, PeftMixedBatchBackend
from .metrics import Metrics
from .model_loader import BaseModel, load_base_model, resolve_device
from .precision import probe_device, unquantized_weights
from .routing import TenantRouter
from .settings import ServeSettings
from .tenants import TenantDirectory

log = logging.getLogger("loramux.server")


@dataclass
class Runtime:
    settings: ServeSettings
    base: BaseModel
    cache: AdapterCache
    tenants: TenantDirectory
    engine: Engine
    metrics: Metrics
    admin_token: Token  # .current() per request: a rotated token file takes effect
    access: AccessControl  # who may call which model (API key hashes)
    router: TenantRouter | None = None
    # The LoRA backend the cache loads adapters into (reports what decode steps run).
    backend: LoraBackend | None = None
    # What the base's linear layers run on a CPU: oneDNN on packed weights, or torch.
    cpu_linear: CpuLinearState = field(
        default_factory=lambda: CpuLinearState("torch", "not requested"))
    # The port /admin/* is served on when it is separate (settings.admin_port, bound).
    admin_port: int | None = None
    # The port the per-tenant /metrics is served on (settings.metrics_port, bound).
    metrics_port: int | None = None
    started_at: float = field(default_factory=time.time)
    version: str = __version__

    @property
    def tokenizer(self):
        return self.base.tokenizer

    @property
    def base_name(self) -> str:
        return self.base.name

    @property
    def base_names(self) -> tuple[str, ...]:
        return (self.base.name, *self.base.aliases)

    @property
    def context_length(self) -> int | None:
        value = getattr(self.base.model.config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None

    @property
    def quantization(self) -> str:
        return self.base.quantization


def parse_adapter_flag(text: str) -> tuple[AdapterRef, Path]:
    ref_text, sep, path = text.partition("=")
    if not sep or not path:
        raise ValueError(f"--adapter {text!r}: expected tenant@version=PATH")
    tenant, at, version = ref_text.partition("@")
    if not at:
        raise ValueError(f"--adapter {text!r}: expected tenant@version=PATH")
    return AdapterRef(tenant, version), Path(path)


def _merge_ref(settings: ServeSettings, path: Path) -> AdapterRef:
    if settings.merge_adapter_ref:
        tenant, _, version = settings.merge_adapter_ref.partition("@")
        return AdapterRef(tenant, version or "merged")
    try:
        return AdapterRef(path.parent.name, path.name)
    except InvalidName as exc:
        raise ValueError(
            "--merge-adapter path is not <tenant>/<version>; pass --merge-adapter-ref"
        ) from exc


def lora_dtype(settings: ServeSettings, base: BaseModel) -> torch.dtype:
    """The batched LoRA stacks' dtype: fp32, or (``auto``) the base's compute dtype."""
    if settings.lora_dtype in ("auto", "compute") and base.precision is not None:
        return base.precision.torch_dtype
    return torch.float32


def start_kernel(backend: BatchedLoraBackend, settings: ServeSettings) -> None:
    """Give the backend loramux's CPU decode kernel (inference/bgmv.py): at once when it is
    built on this machine, else after a build in the background (about a minute, once per
    machine) while the plain-torch path serves. Where it cannot be built, plain torch."""
    from . import bgmv

    if settings.lora_kernel == "off":
        backend.set_kernel_state("torch", "--lora-kernel off")
        return
    if backend.model_device.type != "cpu":
        backend.set_kernel_state("torch", f"the model is on {backend.model_device.type}: the "
                                 "kernel is CPU-only")
        return

    def load() -> None:
        op, reason = bgmv.load(settings.kernel_dir)
        if op is None:
            backend.set_kernel_state("torch", reason)
        else:
            backend.enable_kernel(op, reason)

    if bgmv.built(settings.kernel_dir):
        load()
        return
    backend.set_kernel_state("building", "building the CPU kernel in the background; plain "
                             "torch until it is ready")
    threading.Thread(target=load, name="kernel-build", daemon=True).start()


def build_runtime(settings: ServeSettings) -> Runtime:
    confine_torch_threads()  # before loading: this thread must not own an OpenMP team
    # Before the model: a bad access file fails start-up at once (AccessFileError).
    access = AccessControl(settings.auth, settings.access_file)
    quantization = settings.quantization
    if settings.merge_adapter is not None and quantization in ("auto", "nf4"):
        # Merging into 4-bit weights is lossy: merge into an unquantized copy in the compute
        # dtype instead.
        quantization = unquantized_weights(settings.compute_dtype,
                                           probe_device(resolve_device(settings.device)))
        log.info("merge mode: loading the base unquantized for an exact merge",
                 extra={"quantization": quantization})
    base = load_base_model(settings.model, quantization, settings.device, settings.cache_dir,
                           settings.served_model_name, settings.compute_dtype)
    facts = BaseFacts.from_model(base.model, base.aliases)
    metrics = Metrics(settings.metrics_tenant_histograms)
    metrics.precision.info(base.precision_view(flat=True))
    merged_ref: AdapterRef | None = None
    merged_bytes = merged_rank = 0
    if settings.merge_adapter is not None:
        merged_ref = _merge_ref(settings, settings.merge_adapter)
        host = read_adapter(settings.merge_adapter, facts, settings.max_lora_rank,
                            settings.allow_pickle_adapters)
        merger = PeftMixedBatchBackend(base.model)
        merger.add("merged", host)
        merged_model = merger.model.merge_and_unload()
        merged_model.eval()
        base.model = merged_model
        merged_bytes, merged_rank = host.nbytes, host.rank
        log.info("adapter merged into the base",
                 extra={"tenant": merged_ref.tenant, "version": merged_ref.version})
    backend: LoraBackend = (
        BatchedLoraBackend(base.model, lora_dtype=lora_dtype(settings, base),
                           merge_uniform=settings.merge_uniform_batches)
        if settings.lora_backend == "batched"
        else PeftMixedBatchBackend(base.model)
    )
    if isinstance(backend, BatchedLoraBackend):
        start_kernel(backend, settings)
    # After any merge and after the backend wrapped its layers: packing copies the weights.
    cpu_linear = pack_linears(base.model, settings.cpu_linear)
    cache = AdapterCache(
        facts, backend, metrics,
        device_slots=settings.device_adapter_slots,
        device_bytes=settings.device_cache_bytes,
        host_bytes=settings.host_cache_bytes,
        max_rank=settings.max_lora_rank,
        allow_pickle=settings.allow_pickle_adapters,
    )
    tenants = TenantDirectory(cache, metrics, base_names=(base.name, *base.aliases),
                              unknown_tenant=settings.unknown_tenant)
    eos: set[int] = set()
    for source in (base.tokenizer.eos_token_id,
                   getattr(base.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            eos.add(source)
        elif isinstance(source, list):
            eos.update(int(x) for x in source)
    engine = Engine(
        base.model.config, base.tokenizer, backend, cache, metrics,
        device=base.device,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_prefill_tokens=settings.max_prefill_tokens,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        eos_token_ids=eos,
        torch_threads=settings.torch_threads,
        admission=settings.admission,
        prompt_token_cost=settings.prompt_token_cost,
        output_token_cost=settings.output_token_cost,
        default_policy=default_policy(settings),
        prefetch_adapters=settings.prefetch_adapters,
        max_queue_wait_s=settings.max_queue_wait_s,
    )
    access.attach(lambda tenant, a: _apply_policy(settings, engine, tenant, a))
    runtime = Runtime(settings, base, cache, tenants, engine, metrics,
                      settings.resolved_admin_token(), access, backend=backend,
                      cpu_linear=cpu_linear)
    if merged_ref is not None:
        tenants.register_merged(merged_ref, merged_bytes, merged_rank)
    pinned = set(settings.pin)
    for flag in settings.adapter:
        ref, path = parse_adapter_flag(flag)
        try:
            tenants.register(ref, path, pinned=str(ref) in pinned, activate=True).result()
        except AdapterRejected as exc:
            # One bad preload fails alone; it shows in /admin/adapters with its reason.
            log.error("preloaded adapter rejected",
                      extra={"tenant": ref.tenant, "version": ref.version, "reason": exc.code,
                             "detail": exc.message})
    return runtime


def default_policy(settings: ServeSettings) -> TenantPolicy:
    return TenantPolicy(max_concurrent=settings.tenant_max_concurrent,
                        tokens_per_minute=settings.tenant_tokens_per_minute,
                        max_queued=settings.tenant_max_queued)


def _apply_policy(settings: ServeSettings, engine: Engine, tenant: str,
                  access: TenantAccess | None) -> None:
    """A tenant's weight and limits (its own, else the server's defaults) to the engine."""
    if access is None:
        policy = None
    else:
        default, limits = default_policy(settings), access.limits
        policy = TenantPolicy(
            weight=access.weight,
            max_concurrent=(limits.max_concurrent if limits.max_concurrent is not None
                            else default.max_concurrent),
            tokens_per_minute=(limits.tokens_per_minute if limits.tokens_per_minute is not None
                               else default.tokens_per_minute),
            max_queued=(limits.max_queued if limits.max_queued is not None
                        else default.max_queued))
    set_policy = getattr(engine, "set_tenant_policy", None)
    if set_policy is not None:
        set_policy(tenant, policy)


def _listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(settings: ServeSettings) -> None:
    import uvicorn

    from loramux.logs import configure_logging

    from .app import create_app

    configure_logging(settings.log_level, settings.log_format)
    torch.set_grad_enabled(False)
    runtime = build_runtime(settings)
    app = create_app(runtime)
    # proxy_headers=False: uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1
    # and let anything that proxies over loopback pick the client address /admin trusts.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            proxy_headers=False,
                            timeout_graceful_shutdown=int(settings.drain_timeout_s))
    if settings.admin_port is None and settings.metrics_port is None:
        uvicorn.Server(config).run()
        return
    public = _listen_socket(settings.host, settings.port)
    sockets = [public]
    extra: list[tuple[str, socket.socket]] = []
    if settings.admin_port is not None:
        admin = _listen_socket(settings.admin_host, settings.admin_port)
        runtime.admin_port = admin.getsockname()[1]
        extra.append(("admin API", admin))
    if settings.metrics_port is not None:
        metrics = _listen_socket(settings.metrics_host, settings.metrics_port)
        runtime.metrics_port = metrics.getsockname()[1]
        extra.append(("per-tenant metrics", metrics))
    sockets += [sock for _, sock in extra]

    class MultiPortServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # uvicorn logs nothing for sockets it is handed
                logging.getLogger("uvicorn.error").info(
                    "Uvicorn running on %s (Press CTRL+C to quit)", _url(public))
                for what, sock in extra:
                    log.info(f"{what} listening on {_url(sock)}",
                             extra={"port": sock.getsockname()[1]})

    MultiPortServer(config).run(sockets=sockets)
