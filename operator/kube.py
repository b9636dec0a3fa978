"""The few Kubernetes API calls the reconciler makes (list, get, merge-patch status, events,
and a hot tenant's dedicated Deployments and Services).

The official client (synchronous) runs in worker threads; every answer is kept as the raw
JSON dictionaries the API sent, which is what the pure functions take. Works with any
kubeconfig, including a plain-HTTP API server, or in-cluster service-account credentials.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from loramux.operator.model import GROUP, PLURAL, VERSION

log = logging.getLogger("loramux.operator.kube")

MERGE_PATCH = "application/merge-patch+json"


class KubeError(Exception):
    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status


def load_api_client() -> Any:
    """An ApiClient from in-cluster credentials, else the kubeconfig (KUBECONFIG, ~/.kube)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


class KubeApi:
    def __init__(self, api_client: Any = None) -> None:
        from kubernetes import client

        self.api_client = api_client if api_client is not None else load_api_client()
        self.core = client.CoreV1Api(self.api_client)
        self.apps = client.AppsV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        def run() -> Any:
            response = fn(*args, _preload_content=False, **kwargs)
            data = response.data
            return json.loads(data) if data else None

        try:
            return await asyncio.to_thread(run)
        except ApiException as exc:
            raise KubeError(exc.status, f"{exc.status} {exc.reason}") from None
        except Exception as exc:  # connection refused, timeouts, bad JSON
            raise KubeError(None, f"{type(exc).__name__}: {exc}") from None

    async def list_adapters(self, namespace: str | None) -> list[dict[str, Any]]:
        if namespace:
            body = await self._call(self.custom.list_namespaced_custom_object,
                                    GROUP, VERSION, namespace, PLURAL)
        else:
            body = await self._call(self.custom.list_cluster_custom_object,
                                    GROUP, VERSION, PLURAL)
        return list((body or {}).get("items") or [])

    async def _list(self, namespaced: Any, everywhere: Any, namespace: str | None,
                    **kwargs: Any) -> list[dict[str, Any]]:
        """A core or apps list call, in one namespace or in all of them; the items."""
        if namespace:
            body = await self._call(namespaced, namespace, **kwargs)
        else:
            body = await self._call(everywhere, **kwargs)
        return list((body or {}).get("items") or [])

    async def list_pods(self, namespace: str | None) -> list[dict[str, Any]]:
        return await self._list(self.core.list_namespaced_pod,
                                self.core.list_pod_for_all_namespaces, namespace)

    # ----------------------------------------------------------------- dedicated objects
    async def list_deployments(self, namespace: str | None, label_selector: str
                               ) -> list[dict[str, Any]]:
        return await self._list(self.apps.list_namespaced_deployment,
                                self.apps.list_deployment_for_all_namespaces, namespace,
                                label_selector=label_selector)

    async def list_services(self, namespace: str | None, label_selector: str
                            ) -> list[dict[str, Any]]:
        return await self._list(self.core.list_namespaced_service,
                                self.core.list_service_for_all_namespaces, namespace,
                                label_selector=label_selector)

    async def create_deployment(self, body: Mapping[str, Any]) -> None:
        await self._call(self.apps.create_namespaced_deployment,
                         body["metadata"]["namespace"], dict(body))

    async def create_service(self, body: Mapping[str, Any]) -> None:
        await self._call(self.core.create_namespaced_service,
                         body["metadata"]["namespace"], dict(body))

    async def delete_deployment(self, namespace: str, name: str) -> bool:
        """Delete; False when it was already gone."""
        return await self._delete(self.apps.delete_namespaced_deployment, namespace, name)

    async def delete_service(self, namespace: str, name: str) -> bool:
        """Delete; False when it was already gone."""
        return await self._delete(self.core.delete_namespaced_service, namespace, name)

    async def _delete(self, fn: Any, namespace: str, name: str) -> bool:
        try:
            await self._call(fn, name, namespace)
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # ----------------------------------------------------------------- the rest
    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call(self.core.read_namespaced_secret, name, namespace)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def create_secret(self, body: Mapping[str, Any]) -> None:
        await self._call(self.core.create_namespaced_secret,
                         body["metadata"]["namespace"], dict(body))

    async def merge_patch_secret(self, namespace: str, name: str,
                                 patch: Mapping[str, Any]) -> None:
        await self._call(self.core.patch_namespaced_secret, name, namespace, dict(patch),
                         _content_type=MERGE_PATCH)

    async def delete_secret(self, namespace: str, name: str) -> bool:
        """Delete; False when it was already gone."""
        return await self._delete(self.core.delete_namespaced_secret, namespace, name)

    async def patch_adapter_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Merge-patch ``status`` through the status subresource: the object as written, or
        ``None`` when it is gone (404)."""
        try:
            body = await self._call(self.custom.patch_namespaced_custom_object_status,
                                    GROUP, VERSION, namespace, PLURAL, name,
                                    {"status": dict(status)}, _content_type=MERGE_PATCH)
        except KubeError as exc:
            if exc.status != 404:
                raise
            return None
        return body if isinstance(body, dict) else None

    async def patch_adapter(self, namespace: str, name: str,
                            patch: Mapping[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the object itself (a canary's promotion rewrites its spec): the object
        as written, or ``None`` when it is gone (404)."""
        try:
            body = await self._call(self.custom.patch_namespaced_custom_object,
                                    GROUP, VERSION, namespace, PLURAL, name, dict(patch),
                                    _content_type=MERGE_PATCH)
        except KubeError as exc:
            if exc.status != 404:
                raise
            return None
        return body if isinstance(body, dict) else None

    async def post_event(self, obj: Mapping[str, Any], type_: str, reason: str,
                         message: str) -> None:
        """A core/v1 Event about ``obj``. Failures are logged, never raised: an API server
        that refuses Events must not stop reconciliation.

        Not ``kopf.event``: kopf queues events through context variables it sets only inside
        its per-object handler tasks, and the reconcile loop is a task of its own (unit tests
        run it with no kopf operator at all)."""
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta.get('name', 'x')}.{uuid.uuid4().hex[:16]}",
                         "namespace": namespace},
            "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                               "name": meta.get("name"), "namespace": namespace,
                               "uid": meta.get("uid")},
            "type": type_, "reason": reason[:128], "message": message[:1024],
            "source": {"component": "loramux-operator"},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "reportingComponent": "loramux-operator", "reportingInstance": "loramux-operator",
        }
        try:
            await self._call(self.core.create_namespaced_event, namespace, event)
        except KubeError as exc:
            log.debug("could not post event %s on %s: %s", reason, meta.get("name"), exc)

    async def get_peering(self, name: str, namespace: str | None) -> dict[str, Any] | None:
        """kopf's peering object (KopfPeering in ``namespace``, else ClusterKopfPeering)."""
        try:
            if namespace:
                return await self._call(self.custom.get_namespaced_custom_object,
                                        "kopf.dev", "v1", namespace, "kopfpeerings", name)
            return await self._call(self.custom.get_cluster_custom_object,
                                    "kopf.dev", "v1", "clusterkopfpeerings", name)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
