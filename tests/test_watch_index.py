"""The operator's watch-fed index (operator/index.py): what a pass reads between full lists."""

from __future__ import annotations

from typing import Any

from loramux.operator.index import WatchIndex


def obj(name: str, rv: int | str | None, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": "default", "name": name}
    if rv is not None:
        meta["resourceVersion"] = str(rv)
    return {"metadata": meta, **extra}


def names(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {o["metadata"]["name"]: o.get("spec") for o in items}


def test_not_fresh_until_listed_and_watched_and_stale_after_relist_period() -> None:
    index = WatchIndex(relist_seconds=10)
    assert not index.fresh()
    index.watching = True
    assert not index.fresh()  # watched but never listed: kopf's first events may be partial
    index.begin_list()
    index.replace([obj("a", 1)], [obj("p", 2)])
    assert index.fresh()
    assert index.listed_at is not None
    assert not index.fresh(now=index.listed_at + 10.5)
    unwatched = WatchIndex(relist_seconds=10)
    unwatched.begin_list()
    unwatched.replace([], [])
    assert not unwatched.fresh()  # nothing feeds it: every pass lists


def test_events_add_modify_delete_and_stale_ones_are_ignored() -> None:
    index = WatchIndex()
    index.begin_list()
    index.replace([obj("a", 5, spec={"v": 1})], [])
    index.apply("adapter", "MODIFIED", obj("a", 7, spec={"v": 2}))
    index.apply("adapter", "MODIFIED", obj("a", 6, spec={"v": "late"}))  # older: ignored
    index.apply("adapter", None, obj("b", 8, spec={"v": 1}))  # kopf's initial listing
    assert names(index.adapters()) == {"a": {"v": 2}, "b": {"v": 1}}
    assert index.stats.stale == 1
    index.apply("adapter", "DELETED", obj("a", 9))
    assert names(index.adapters()) == {"b": {"v": 1}}
    index.apply("pod", "ADDED", obj("p", 3))
    assert names(index.pods()) == {"p": None}
    assert index.adapters() is not index.adapters()  # a new list each read


def test_events_during_a_list_survive_the_list_result() -> None:
    """A list's snapshot may be older than events that arrived while it was in flight."""
    index = WatchIndex()
    index.begin_list()
    index.apply("adapter", "ADDED", obj("new", 12, spec={"v": 1}))
    index.apply("adapter", "MODIFIED", obj("a", 11, spec={"v": 2}))
    index.apply("adapter", "DELETED", obj("gone", 13))
    # the snapshot, taken at revision 10, still has "gone" and the old "a"
    index.replace([obj("a", 10, spec={"v": 1}), obj("gone", 9, spec={"v": 1})], [])
    assert names(index.adapters()) == {"a": {"v": 2}, "new": {"v": 1}}


def test_a_failed_list_keeps_what_the_index_held() -> None:
    index = WatchIndex()
    index.begin_list()
    index.replace([obj("a", 1)], [])
    index.begin_list()
    index.abort_list()
    index.apply("adapter", "MODIFIED", obj("a", 2, spec={"v": 2}))
    assert names(index.adapters()) == {"a": {"v": 2}}


def test_objects_without_integer_versions_are_applied_in_arrival_order() -> None:
    index = WatchIndex()
    index.apply("adapter", "ADDED", obj("a", "x1", spec={"v": 1}))
    index.apply("adapter", "MODIFIED", obj("a", None, spec={"v": 2}))
    assert names(index.adapters()) == {"a": {"v": 2}}
    index.apply("adapter", "ADDED", obj("", 1))  # no name: not an object of ours
    assert len(index.adapters()) == 1
