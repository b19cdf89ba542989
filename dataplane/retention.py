"""Retention of ``captures/``: what is old and unused is deleted, nothing anyone relies on.

Capture grows with traffic; a capture is worth keeping while it may still be exported for
annotation, and for good once it was sent to annotators (an ``exports/`` record) or became a
sample of a dataset version (its id in a manifest's import notes or split lists). Everything
else older than the retention period is deleted, its metadata last, so an interrupted prune
leaves no record pointing at a missing image.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

from dataplane.store import EXPORTS_PREFIX, ObjectStore
from segloop.errors import ConfigError


@dataclass
class PruneResult:
    """What one prune did (or, with ``dry_run``, would do)."""

    deleted: list[str] = field(default_factory=list)  # capture ids
    kept_in_use: int = 0
    kept_recent: int = 0
    objects_deleted: int = 0


def captures_in_use(store: ObjectStore) -> set[str]:
    """Capture ids that an export sent to annotators or a dataset version holds."""
    from dataplane.versions import list_datasets, list_versions

    used: set[str] = set()
    for key in store.list(EXPORTS_PREFIX):
        if key.endswith(".json"):
            used.update(str(c.get("id")) for c in store.get_json(key).get("captures", []))
    for name in list_datasets(store):
        for m in list_versions(store, name):
            used.update(str(c) for c in (m.notes or {}).get("import", {}).get("captures", []))
            for names in m.splits.values():
                used.update(names)
    return used


def prune_captures(
    store: ObjectStore, older_than_days: float, *, now: _dt.datetime | None = None, dry_run: bool = False
) -> PruneResult:
    """Delete the captures of days more than ``older_than_days`` ago that nothing uses."""
    if not isinstance(older_than_days, (int, float)) or older_than_days < 1:
        raise ConfigError(f"retention must be at least 1 day, got {older_than_days!r}")
    cutoff = ((now or _dt.datetime.now(_dt.UTC)) - _dt.timedelta(days=older_than_days)).strftime("%Y-%m-%d")
    used, out = captures_in_use(store), PruneResult()
    by_id: dict[str, list[str]] = {}
    for key in store.list("captures/"):
        parts = key.split("/")
        if len(parts) != 3:
            continue
        cid = parts[2].split(".", 1)[0]
        if parts[1] >= cutoff:
            out.kept_recent += key.endswith(".json")
        elif cid in used:
            out.kept_in_use += key.endswith(".json")
        else:
            by_id.setdefault(cid, []).append(key)
    for cid, keys in sorted(by_id.items()):
        out.deleted.append(cid)
        out.objects_deleted += len(keys)
        if not dry_run:
            for key in sorted(keys, key=lambda k: k.endswith(".json")):  # the metadata last
                store.delete(key)
    return out
