"""The adapter-sync sidecar (``loramux sync``): makes one inference server's adapters match
the desired set its operator sends.

The desired set (``PUT /v1/desired``, :class:`~loramux.contracts.DesiredState`) lists
``tenant``/``version``/``uri`` entries. A level-triggered reconcile loop
(:class:`~loramux.sync.reconciler.Reconciler`) compares it with what is actually there - the
verified versions on the shared volume (:func:`~loramux.inference.adapter_store.list_local`)
and the server's ``GET /admin/adapters`` (:class:`~loramux.contracts.AdapterList`) - and
closes the gap, one pass at a time:

0. each tenant's access (:class:`~loramux.contracts.TenantAccess`: the SHA-256 hashes of
   its API keys, its fair-share weight and its limits, carried by its desired entries) is
   pushed with ``PUT /admin/tenants/{tenant}/access`` when the server's ``GET /admin/access``
   has no admin-pushed row for it or one with another fingerprint, before any of its
   versions is loaded or activated; admin-pushed access of a tenant that no longer has any
   is removed with ``DELETE`` (never before the first ``PUT /v1/desired``). Rows the server
   read from its ``--access-file`` are not the sidecar's. A server without
   ``/admin/access`` (404: older) is logged once and skipped. Hashes are never logged,
   only key counts and fingerprints;
1. every desired version that is not yet on the server is fetched (atomic, verified:
   :func:`~loramux.inference.adapter_store.fetch_adapter`, retried with backoff by the one
   :class:`~loramux.s3.RetryPolicy` when the failure is transient or ``not_found``) and then
   loaded with ``PUT /admin/adapters/{tenant}/{version}``;
2. a tenant's active version (``active: true``, or its only desired version) is switched
   with ``PUT /admin/tenants/{tenant}/active`` once that version is ready on the server;
3. versions loaded on the server but no longer desired are evicted - for a tenant that is
   still desired only after its active version is ready and active (load new, activate,
   evict old; when the new version fails, the old one stays loaded and active) - and never
   before the first ``PUT /v1/desired`` (a restarted sidecar does not mistake "not told
   yet" for "nothing"). Only versions the server loaded from under ``root`` are the
   sidecar's to evict; ones it was started with (``serve --adapter``) are left alone;
4. a hot tenant's route (``route`` on its active version) is set on the server with
   ``PUT /admin/tenants/{tenant}/route`` while that version is Ready here (the local copy
   is the fallback), and removed when no longer wanted;
5. local files of versions neither desired nor loaded are deleted (same condition as 3).

``GET /v1/state`` (:class:`~loramux.contracts.SyncState`) reports each desired version's
phase (:class:`~loramux.contracts.SyncPhase`), the routes and the server's own last answers
(``server``: its adapters, ``access``: its tenant access, counts and fingerprints only);
the operator reads a pod's state from there only. ``GET /readyz`` is 200 only when the
versions selected by ``require_ready_for`` are Ready (default: pinned ones and each tenant's
active or only version); otherwise 503 with what is missing and why.

S3 credentials, per fetch (:mod:`loramux.sync.credentials`): the entry's own
``credentials`` (sent by the operator from the LoraAdapter's ``source.credentialsSecret``),
else the mounted secret directory ``s3_credentials_dir`` (re-read for every fetch, so
rotation works), else the standard AWS environment. Parts an entry leaves unset (region,
endpoint) come from the mounted secret, then the environment. Clients are cached by a digest
of the credentials. Secrets are never logged nor returned (``GET /v1/desired`` masks them), a
change of credentials alone does not restart a Ready version, and a version that failed to
reach the store (access_denied, not_found, io_error) is tried again as soon as its
credentials change.

Because every pass re-reads the actual state, the sidecar converges after a restart of
itself or of the server. One failing adapter never blocks the others: each fetch-and-load
runs as its own task. A server answer that is not what the contract says (not JSON, not an
``AdapterList``, ``RouteList`` or ``AccessList``) is that pass's failure only, like an
unreachable server (``loramux_sync_server_errors_total``); the next pass asks again.

Tokens (``--token-file`` for this sidecar's ``/v1``, ``--server-token-file`` for the
server's ``/admin``) are :class:`loramux.tokens.Token`: re-read when the mounted Secret is
swapped, checked and sent per request, so a rotation needs no restart.

Modules: :mod:`~loramux.sync.settings` (``SyncSettings``), :mod:`~loramux.sync.reconciler`,
:mod:`~loramux.sync.credentials`, :mod:`~loramux.sync.metrics`, :mod:`~loramux.sync.app`
(``create_app``) and :mod:`~loramux.sync.cli` (``main``). Importable in the inference image:
no kopf, no kubernetes, nothing from ``loramux.training``; importing this package itself
imports nothing.
"""
