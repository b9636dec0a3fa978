"""Plain views of the objects the operator reasons about: LoraAdapter specs and pods.

Pure functions over the dictionaries the Kubernetes API returns; no I/O. The CRD's schema
is enforced again here because not every API server validates it (and an invalid object
must end as a clear condition, never as a crash loop).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loramux.contracts import TenantLimits
from loramux.names import InvalidName, validate_label
from loramux.operator.canary import CanarySpec, parse_canary
from loramux.operator.hot_policy import Mode, Thresholds
from loramux.s3 import S3Error, parse_s3_uri

GROUP = "loramux.io"
VERSION = "v1alpha1"
PLURAL = "loraadapters"
KIND = "LoraAdapter"
API_VERSION = f"{GROUP}/{VERSION}"

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
SECRET_NAME_PATTERN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

ObjectKey = tuple[str, str]  # (namespace, name) of a LoraAdapter
PodKey = tuple[str, str]  # (namespace, name) of a pod

DEDICATED_MODES: tuple[Mode, ...] = ("Never", "Always", "Auto")

# Bounds the CRD also states (crds/loraadapter.yaml), enforced here again because not every
# API server validates: a LoraAdapter beyond them is Validated=False, never half-applied.
MAX_DEDICATED_REPLICAS = 64  # the CRD's hard maximum of spec.dedicated.replicas
DEFAULT_MAX_DEDICATED_REPLICAS = 8  # the operator's own limit (--max-dedicated-replicas)
MIN_DWELL_SECONDS = 5  # spec.dedicated.minDwellSeconds: no promote/demote flapping
MAX_NAME_LENGTH = 63  # the LoraAdapter's name is a label value of its dedicated objects
MAX_MATCH_LABELS = 32
MAX_MATCH_EXPRESSIONS = 16
MAX_SELECTOR_VALUES = 64
MAX_LABEL_KEY_LENGTH = 317  # a 253-character prefix, "/", a 63-character name
MAX_LABEL_VALUE_LENGTH = 63


@dataclass(frozen=True)
class DedicatedSpec:
    """``spec.dedicated``, parsed once: whether and when the tenant gets its own merged
    Deployment. ``problem`` (an invalid mode or thresholds) makes the hot-tenant policy hold
    whatever exists, as the CRD's schema should have refused it already."""

    mode: Mode = "Never"
    replicas: int = 1
    thresholds: Thresholds = field(default_factory=Thresholds)
    problem: str | None = None

    @classmethod
    def parse(cls, raw: Any) -> DedicatedSpec:
        dedicated = raw if isinstance(raw, Mapping) else {}
        mode = dedicated.get("mode", "Never")
        replicas = dedicated.get("replicas")
        replicas = (replicas if isinstance(replicas, int) and not isinstance(replicas, bool)
                    and replicas >= 1 else 1)
        if mode not in DEDICATED_MODES:
            return cls(replicas=replicas, problem=f"invalid mode: {mode!r}")
        try:
            thresholds = Thresholds.from_spec(dict(dedicated))
        except (TypeError, ValueError) as exc:
            return cls(mode=mode, replicas=replicas, problem=f"invalid thresholds: {exc}")
        return cls(mode=mode, replicas=replicas, thresholds=thresholds)


# spec.access.limits (camelCase in the CRD) -> TenantLimits fields, with their bounds (the
# contract's: loramux.contracts.TenantLimits).
ACCESS_LIMITS: dict[str, tuple[str, int, int]] = {
    "maxConcurrent": ("max_concurrent", 1, 100_000),
    "tokensPerMinute": ("tokens_per_minute", 1, 10**12),
    "maxQueued": ("max_queued", 1, 100_000),  # every request waits a step: 0 refuses all
}
MAX_ACCESS_WEIGHT = 1000.0


@dataclass(frozen=True)
class AccessSpec:
    """``spec.access``, parsed: the Secret holding the tenant's API keys (every data entry
    is one key; the operator reads it each pass and sends only SHA-256 hashes), the tenant's
    weight in the servers' fair scheduler, and its limits (None: the server's default)."""

    secret_name: str
    weight: float = 1.0
    limits: TenantLimits = field(default_factory=TenantLimits)

    @classmethod
    def parse(cls, raw: Any) -> tuple[AccessSpec | None, str | None]:
        """``(AccessSpec, None)``, ``(None, None)`` when absent, or ``(None, problem)``."""
        if raw is None:
            return None, None
        if not isinstance(raw, Mapping):
            return None, "spec.access must be an object (secretName, weight?, limits?)"
        unknown = set(raw) - {"secretName", "weight", "limits"}
        if unknown:
            return None, f"spec.access has unknown fields {sorted(unknown)}"
        secret = raw.get("secretName")
        if (not isinstance(secret, str) or len(secret) > 253
                or not SECRET_NAME_PATTERN.fullmatch(secret)):
            return None, "spec.access.secretName (a Secret name) is required"
        weight = raw.get("weight", 1)
        if (isinstance(weight, bool) or not isinstance(weight, int | float)
                or not math.isfinite(weight) or not 0 < weight <= MAX_ACCESS_WEIGHT):
            return None, "spec.access.weight must be a number > 0 and <= 1000"
        limits_raw = raw.get("limits")
        if limits_raw is None:
            limits_raw = {}
        if not isinstance(limits_raw, Mapping):
            return None, "spec.access.limits must be an object"
        unknown = set(limits_raw) - set(ACCESS_LIMITS)
        if unknown:
            return None, f"spec.access.limits has unknown fields {sorted(unknown)}"
        limits: dict[str, int] = {}
        for key, (attr, low, high) in ACCESS_LIMITS.items():
            value = limits_raw.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                return None, f"spec.access.limits.{key} must be an integer from {low} to {high}"
            limits[attr] = value
        return cls(secret_name=secret, weight=float(weight),
                   limits=TenantLimits(**limits)), None


@dataclass(frozen=True)
class ActiveSource:
    """Where a version's files come from. ``status.activeSource`` is the source of the last
    version that became active (written with ``status.activeVersion`` whenever that is the
    spec's version, kept otherwise): the operator's own memory of the version a rollout
    replaces, since the spec only names the new one."""

    version: str
    uri: str
    sha256: str | None = None

    @classmethod
    def from_status(cls, raw: Any) -> ActiveSource | None:
        """None unless ``raw`` is a usable source (a hand-edited status is not trusted)."""
        if not isinstance(raw, Mapping):
            return None
        version, uri, sha = raw.get("version"), raw.get("uri"), raw.get("sha256")
        try:
            validate_label(version, "status.activeSource.version")  # type: ignore[arg-type]
        except InvalidName:
            return None
        if source_uri_problem(uri) is not None:
            return None
        if sha is not None and (not isinstance(sha, str) or not SHA256_PATTERN.fullmatch(sha)):
            return None
        return cls(version=str(version), uri=uri, sha256=sha)

    def view(self) -> dict[str, Any]:
        return {"version": self.version, "uri": self.uri,
                **({"sha256": self.sha256} if self.sha256 else {})}


MOVE_LOADING = "Loading"  # the target loads the adapter; the source serves, both are placed
MOVE_DRAINING = "Draining"  # the target is the holder in the tables; the source drains
MOVE_PHASES = (MOVE_LOADING, MOVE_DRAINING)
MOVED = "Moved"
MOVE_ABANDONED = "Abandoned"
MAX_MOVE_REASON = 500


def _iso(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(raw: Any) -> float | None:
    if not isinstance(raw, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _pod_name(raw: Any) -> str | None:
    return raw if isinstance(raw, str) and 0 < len(raw) <= 253 else None


@dataclass(frozen=True)
class Move:
    """``status.move``: one placement of the adapter moving from pod ``source`` to pod
    ``target`` (same namespace), kept in the status so an operator restart resumes it.
    ``started``: when the move began; ``since``: when its current ``phase`` began (epoch
    seconds, written as RFC 3339)."""

    source: str
    target: str
    phase: str = MOVE_LOADING
    started: float = 0.0
    since: float = 0.0
    reason: str = ""

    def view(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "phase": self.phase,
                "started": _iso(self.started), "since": _iso(self.since),
                "reason": self.reason[:MAX_MOVE_REASON]}

    @classmethod
    def from_status(cls, raw: Any) -> Move | None:
        """None unless ``raw`` is a usable move (a hand-edited status is not trusted)."""
        if not isinstance(raw, Mapping):
            return None
        source, target = _pod_name(raw.get("from")), _pod_name(raw.get("to"))
        started, since = _epoch(raw.get("started")), _epoch(raw.get("since"))
        if (source is None or target is None or source == target
                or raw.get("phase") not in MOVE_PHASES or started is None or since is None):
            return None
        reason = raw.get("reason") if isinstance(raw.get("reason"), str) else ""
        return cls(source=source, target=target, phase=str(raw["phase"]), started=started,
                   since=since, reason=reason)


@dataclass(frozen=True)
class LastMove:
    """``status.lastMove``: how the adapter's last move ended (``Moved`` or ``Abandoned``)
    and when: the per-tenant cool-down of rebalancing counts from ``finished``."""

    source: str
    target: str
    outcome: str
    finished: float
    reason: str = ""

    def view(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "outcome": self.outcome,
                "finished": _iso(self.finished), "reason": self.reason[:MAX_MOVE_REASON]}

    @classmethod
    def from_status(cls, raw: Any) -> LastMove | None:
        if not isinstance(raw, Mapping):
            return None
        source, target = _pod_name(raw.get("from")), _pod_name(raw.get("to"))
        finished = _epoch(raw.get("finished"))
        if (source is None or target is None or finished is None
                or raw.get("outcome") not in (MOVED, MOVE_ABANDONED)):
            return None
        reason = raw.get("reason") if isinstance(raw.get("reason"), str) else ""
        return cls(source=source, target=target, outcome=str(raw["outcome"]),
                   finished=finished, reason=reason)


@dataclass(frozen=True)
class AdapterSpec:
    """One LoraAdapter, parsed. ``error`` is set (and the rest may be partial) when invalid."""

    namespace: str
    name: str
    uid: str = ""
    generation: int = 0
    created: str = ""
    tenant: str = ""
    version: str = ""
    uri: str = ""
    sha256: str | None = None
    credentials_secret: str | None = None
    base_model: str = ""
    pool: Mapping[str, Any] = field(default_factory=dict)
    replicas: int | None = None
    pinned: bool = False
    deleting: bool = False
    previous_pods: tuple[str, ...] = ()  # pods in status.placements (placement memory)
    previous_active: str | None = None  # status.activeVersion
    previous_source: ActiveSource | None = None  # status.activeSource
    move: Move | None = None  # status.move: a placement moving between pods
    last_move: LastMove | None = None  # status.lastMove: the cool-down of rebalancing
    dedicated: DedicatedSpec = field(default_factory=DedicatedSpec)
    access: AccessSpec | None = None  # spec.access (None: no keys of its own)
    canary: CanarySpec | None = None  # spec.canary (None: absent or malformed)
    canary_error: str | None = None  # why spec.canary is malformed (the stable is unaffected)
    canary_status: Mapping[str, Any] | None = None  # status.canary, as last written
    error: str | None = None

    @property
    def key(self) -> ObjectKey:
        return (self.namespace, self.name)

    @property
    def order(self) -> tuple[str, str]:
        """Older first: creationTimestamp (RFC 3339 sorts as text), then name."""
        return (self.created, self.name)

    @property
    def pool_key(self) -> str:
        return canonical_selector(self.pool)

    @property
    def source(self) -> ActiveSource:
        """The source of ``spec.version``."""
        return ActiveSource(version=self.version, uri=self.uri, sha256=self.sha256)


def canonical_selector(selector: Mapping[str, Any] | None) -> str:
    """One text per selector meaning (key order and value order do not matter)."""
    selector = selector or {}
    labels = dict(sorted((selector.get("matchLabels") or {}).items()))
    expressions = sorted(
        (str(e.get("key")), str(e.get("operator")), sorted(str(v) for v in e.get("values") or []))
        for e in selector.get("matchExpressions") or []
        if isinstance(e, Mapping)
    )
    return json.dumps([labels, expressions], sort_keys=True)


def selector_error(selector: Any) -> str | None:
    """Why ``selector`` is not a usable label selector, or None."""
    if not isinstance(selector, Mapping):
        return "spec.pool must be a label selector (matchLabels / matchExpressions)"
    unknown = set(selector) - {"matchLabels", "matchExpressions"}
    if unknown:
        return f"spec.pool has unknown fields {sorted(unknown)}"
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        return "spec.pool.matchLabels must map strings to strings"
    if len(labels) > MAX_MATCH_LABELS:
        return f"spec.pool.matchLabels has more than {MAX_MATCH_LABELS} labels"
    if any(not 0 < len(k) <= MAX_LABEL_KEY_LENGTH or len(v) > MAX_LABEL_VALUE_LENGTH
           for k, v in labels.items()):
        return (f"spec.pool.matchLabels: keys are 1 to {MAX_LABEL_KEY_LENGTH} characters, "
                f"values at most {MAX_LABEL_VALUE_LENGTH}")
    expressions = selector.get("matchExpressions") or []
    if not isinstance(expressions, list):
        return "spec.pool.matchExpressions must be a list"
    if len(expressions) > MAX_MATCH_EXPRESSIONS:
        return f"spec.pool.matchExpressions has more than {MAX_MATCH_EXPRESSIONS} terms"
    for i, expr in enumerate(expressions):
        where = f"spec.pool.matchExpressions[{i}]"
        if not isinstance(expr, Mapping) or not isinstance(expr.get("key"), str):
            return f"{where} needs a key"
        if not 0 < len(expr["key"]) <= MAX_LABEL_KEY_LENGTH:
            return f"{where}.key must be 1 to {MAX_LABEL_KEY_LENGTH} characters"
        op = expr.get("operator")
        if op not in SELECTOR_OPERATORS:
            return f"{where}.operator must be one of {', '.join(SELECTOR_OPERATORS)}"
        values = expr.get("values") or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            return f"{where}.values must be a list of strings"
        if len(values) > MAX_SELECTOR_VALUES or any(
                len(v) > MAX_LABEL_VALUE_LENGTH for v in values):
            return (f"{where}.values: at most {MAX_SELECTOR_VALUES} values of at most "
                    f"{MAX_LABEL_VALUE_LENGTH} characters")
        if op in ("In", "NotIn") and not values:
            return f"{where}: operator {op} needs values"
        if op in ("Exists", "DoesNotExist") and values:
            return f"{where}: operator {op} takes no values"
    if not labels and not expressions:
        return "spec.pool must not be empty (it would select every pod of the namespace)"
    return None


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str] | None) -> bool:
    """Kubernetes label-selector semantics (all terms ANDed). An invalid selector matches none."""
    if selector_error(selector) is not None:
        return False
    assert selector is not None
    labels = labels or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def parse_adapter(obj: Mapping[str, Any], *,
                  max_dedicated_replicas: int = DEFAULT_MAX_DEDICATED_REPLICAS) -> AdapterSpec:
    """Parse a LoraAdapter object; never raises (an invalid spec comes back with ``error``).
    ``max_dedicated_replicas``: the operator's limit of ``spec.dedicated.replicas``."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    previous = tuple(dict.fromkeys(
        str(p.get("pod")) for p in status.get("placements") or []
        if isinstance(p, Mapping) and p.get("pod")
    ))
    base = {
        "namespace": str(meta.get("namespace") or "default"),
        "name": str(meta.get("name") or ""),
        "uid": str(meta.get("uid") or ""),
        "generation": int(meta.get("generation") or 0),
        "created": str(meta.get("creationTimestamp") or ""),
        "deleting": bool(meta.get("deletionTimestamp")),
        "previous_pods": previous,
        "previous_active": status.get("activeVersion") or None,
        "previous_source": ActiveSource.from_status(status.get("activeSource")),
        "move": Move.from_status(status.get("move")),
        "last_move": LastMove.from_status(status.get("lastMove")),
        "canary_status": (status.get("canary") if isinstance(status.get("canary"), Mapping)
                          else None),
    }
    if not isinstance(spec, Mapping):
        return AdapterSpec(**base, error="spec must be an object")
    source = spec.get("source") if isinstance(spec.get("source"), Mapping) else {}
    fields = {
        "tenant": spec.get("tenant") if isinstance(spec.get("tenant"), str) else "",
        "version": spec.get("version") if isinstance(spec.get("version"), str) else "",
        "uri": source.get("uri") if isinstance(source.get("uri"), str) else "",
        "sha256": source.get("sha256"),
        "credentials_secret": source.get("credentialsSecret"),
        "base_model": spec.get("baseModel") if isinstance(spec.get("baseModel"), str) else "",
        "pool": spec.get("pool") if isinstance(spec.get("pool"), Mapping) else {},
        "replicas": spec.get("replicas"),
        "pinned": spec.get("pinned") is True,
        "dedicated": DedicatedSpec.parse(spec.get("dedicated")),
    }
    access, access_error = AccessSpec.parse(spec.get("access"))
    fields["access"] = access
    fields["canary"], fields["canary_error"] = parse_canary(spec.get("canary"),
                                                            fields["version"])
    error = _name_error(base["name"]) or _spec_error(spec, source, fields) or _dedicated_error(
        spec.get("dedicated"), max_dedicated_replicas) or access_error
    if error is not None:
        fields["replicas"] = None
        fields["sha256"] = None
        fields["credentials_secret"] = None
        fields["access"] = None
        fields["canary"] = None
    return AdapterSpec(**base, **fields, error=error)


def source_uri_problem(uri: Any) -> str | None:
    """Why ``uri`` is not a source the sidecar can fetch, by the same rules it applies
    (:func:`loramux.s3.parse_s3_uri`), or None."""
    if not isinstance(uri, str) or not uri or len(uri) > 2048:
        return "a URI of 1 to 2048 characters is required"
    if uri.startswith("file:///"):
        return None if not any(c.isspace() for c in uri) else "no whitespace"
    try:
        parse_s3_uri(uri)
    except S3Error as exc:
        return exc.message
    return None


def _name_error(name: str) -> str | None:
    """The LoraAdapter's name is the value of a label on its dedicated objects."""
    if len(name) > MAX_NAME_LENGTH:
        return (f"metadata.name is {len(name)} characters; at most {MAX_NAME_LENGTH} (it is "
                "used as a label value)")
    return None


def _dedicated_error(dedicated: Any, max_replicas: int) -> str | None:
    """Bounds of ``spec.dedicated`` (the CRD states them too)."""
    if dedicated is None:
        return None
    if not isinstance(dedicated, Mapping):
        return "spec.dedicated must be an object"
    replicas = dedicated.get("replicas")
    if replicas is not None:
        limit = min(max_replicas, MAX_DEDICATED_REPLICAS)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            return "spec.dedicated.replicas must be an integer >= 1"
        if replicas > limit:
            return (f"spec.dedicated.replicas is {replicas}; this operator allows at most "
                    f"{limit} (--max-dedicated-replicas)")
    dwell = dedicated.get("minDwellSeconds")
    if dwell is not None and (isinstance(dwell, bool) or not isinstance(dwell, int | float)
                              or dwell < MIN_DWELL_SECONDS):
        return f"spec.dedicated.minDwellSeconds must be a number >= {MIN_DWELL_SECONDS}"
    return None


def _spec_error(spec: Mapping[str, Any], source: Any, f: dict[str, Any]) -> str | None:
    try:
        validate_label(spec.get("tenant"), "spec.tenant")  # type: ignore[arg-type]
        validate_label(spec.get("version"), "spec.version")  # type: ignore[arg-type]
    except InvalidName as exc:
        return str(exc)
    if not isinstance(spec.get("source"), Mapping):
        return "spec.source is required (uri, sha256?, credentialsSecret?)"
    problem = source_uri_problem(source.get("uri"))
    if problem is not None:
        return f"spec.source.uri must be s3://bucket/prefix/ or file:///path: {problem}"
    sha = source.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not SHA256_PATTERN.fullmatch(sha)):
        return "spec.source.sha256 must be 64 lower-case hex digits"
    secret = source.get("credentialsSecret")
    if secret is not None and (
        not isinstance(secret, str) or len(secret) > 253
        or not SECRET_NAME_PATTERN.fullmatch(secret)
    ):
        return "spec.source.credentialsSecret must be a Secret name"
    if not f["base_model"]:
        return "spec.baseModel is required"
    if "pool" not in spec:
        return "spec.pool (a label selector of the inference pods) is required"
    problem = selector_error(spec.get("pool"))
    if problem:
        return problem
    replicas = spec.get("replicas")
    if replicas is not None and (
        isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1
    ):
        return "spec.replicas must be an integer >= 1 (or absent for every pod of the pool)"
    if "pinned" in spec and not isinstance(spec.get("pinned"), bool):
        return "spec.pinned must be a boolean"
    return None


# --------------------------------------------------------------------------- pods


def pod_key(pod: Mapping[str, Any]) -> PodKey:
    meta = pod.get("metadata") or {}
    return (str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


def pod_ip(pod: Mapping[str, Any]) -> str | None:
    return (pod.get("status") or {}).get("podIP") or None


def pod_is_live(pod: Mapping[str, Any]) -> bool:
    """Not terminating, has an IP, not finished: its sidecar can be told things."""
    meta = pod.get("metadata") or {}
    phase = (pod.get("status") or {}).get("phase")
    return (not meta.get("deletionTimestamp") and pod_ip(pod) is not None
            and phase not in ("Succeeded", "Failed"))


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    """Live and its Ready condition is True."""
    if not pod_is_live(pod):
        return False
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def pod_unready_since(pod: Mapping[str, Any]) -> float | None:
    """When a live pod's Ready condition last turned False (or Unknown), in epoch seconds;
    None while it is Ready, or when the pod does not say (then no grace can be counted)."""
    if not pod_is_live(pod):
        return None
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            if cond.get("status") == "True":
                return None
            return _epoch(cond.get("lastTransitionTime"))
    return None


def container_port(pod: Mapping[str, Any], name: str, default: int) -> int:
    """The containerPort named ``name`` in any container of the pod, else ``default``."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == name and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return default


DEDICATED_APP = "loramux-dedicated"  # hot tenants' merged pods: never part of a pool


# pods_in_pool's answers for the pod list it was last asked about: a pass asks for every
# adapter several times, and most adapters share a selector (1,000 adapters x 20 pods took
# ~80,000 selector checks, half of a pass). Keyed by the list object itself (held here, so
# its id cannot be reused), by namespace and by the selector's canonical text.
_POOL_MEMO: dict[str, Any] = {"pods": None, "answers": {}}


def pods_in_pool(spec: AdapterSpec, pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Live pods of the spec's namespace that its pool selects (none if the spec is invalid).
    A hot tenant's dedicated pod never counts, even if a broad selector matches it."""
    if spec.error is not None:
        return []
    if _POOL_MEMO["pods"] is not pods:
        _POOL_MEMO["pods"], _POOL_MEMO["answers"] = pods, {}
    key = (spec.namespace, spec.pool_key, len(pods))
    answers: dict[tuple[str, str, int], list[Mapping[str, Any]]] = _POOL_MEMO["answers"]
    found = answers.get(key)
    if found is None:
        found = answers[key] = [
            pod for pod in pods
            if pod_key(pod)[0] == spec.namespace and pod_is_live(pod)
            and selector_matches(spec.pool, labels := (pod.get("metadata") or {}).get("labels"))
            and (labels or {}).get("app.kubernetes.io/name") != DEDICATED_APP
        ]
    return list(found)


def pod_is_draining(pod: Mapping[str, Any]) -> bool:
    """Terminating (deletionTimestamp set) but still with an IP and not finished: in its
    grace period, out of the Service's endpoints, possibly still serving."""
    meta = pod.get("metadata") or {}
    phase = (pod.get("status") or {}).get("phase")
    return (bool(meta.get("deletionTimestamp")) and pod_ip(pod) is not None
            and phase not in ("Succeeded", "Failed"))


def pods_draining_in_pool(spec: AdapterSpec, pods: Sequence[Mapping[str, Any]]
                          ) -> list[Mapping[str, Any]]:
    """Like :func:`pods_in_pool`, for the pool's pods in their grace period."""
    if spec.error is not None:
        return []
    return [
        pod for pod in pods
        if pod_key(pod)[0] == spec.namespace and pod_is_draining(pod)
        and selector_matches(spec.pool, labels := (pod.get("metadata") or {}).get("labels"))
        and (labels or {}).get("app.kubernetes.io/name") != DEDICATED_APP
    ]


# --------------------------------------------------------------------------- trust


@dataclass(frozen=True)
class PoolOwner:
    """Which pods belong to this install, and so may receive the sidecar token, S3 keys and
    routes: every label of ``labels`` (e.g. ``app.kubernetes.io/instance=<release>``), and
    when ``deployment`` ``(namespace, name)`` is set, a controller ownerReference to a
    ReplicaSet of that Deployment (``<name>-<pod-template-hash>``) in its namespace.
    Empty: every pod a pool selects is trusted (the operator logs a warning at start)."""

    labels: Mapping[str, str] = field(default_factory=dict)
    deployment: tuple[str, str] | None = None

    @property
    def enforced(self) -> bool:
        return bool(self.labels) or self.deployment is not None

    @classmethod
    def parse(cls, labels: str | None, deployment: str | None) -> PoolOwner:
        """From ``key=value[,key=value]`` and ``namespace/name``; raises ValueError."""
        parsed: dict[str, str] = {}
        for item in (labels or "").split(","):
            if not item.strip():
                continue
            key, sep, value = item.strip().partition("=")
            if not sep or not key:
                raise ValueError(f"pool owner label {item!r} is not key=value")
            parsed[key] = value
        owner = None
        if deployment:
            namespace, sep, name = deployment.partition("/")
            if not sep or not namespace or not name:
                raise ValueError(f"pool owner deployment {deployment!r} is not namespace/name")
            owner = (namespace, name)
        return cls(labels=parsed, deployment=owner)

    def why_not(self, pod: Mapping[str, Any]) -> str | None:
        """Why ``pod`` is not this install's, or None when it is."""
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        missing = sorted(k for k, v in self.labels.items() if labels.get(k) != v)
        if missing:
            wanted = ", ".join(f"{k}={self.labels[k]}" for k in missing)
            return f"lacks the install's label(s) {wanted}"
        if self.deployment is None:
            return None
        namespace, name = self.deployment
        if pod_key(pod)[0] != namespace:
            return f"not in namespace {namespace!r} of Deployment {name!r}"
        want = f"{name}-{labels.get('pod-template-hash', '')}"
        for ref in meta.get("ownerReferences") or []:
            if (isinstance(ref, Mapping) and ref.get("controller") is True
                    and ref.get("kind") == "ReplicaSet" and ref.get("apiVersion") == "apps/v1"
                    and ref.get("name") == want and "pod-template-hash" in labels):
                return None
        return f"not controlled by a ReplicaSet of Deployment {namespace}/{name}"
