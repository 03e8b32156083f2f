"""The federation store: one async interface (``api.Store``), etcd and embedded backends."""

from federation.store.api import (
    CasResult,
    Compacted,
    Delete,
    KeyValue,
    Lease,
    LeaseNotFound,
    Put,
    Reset,
    Store,
    StoreError,
    StoreUnavailable,
    WatchEvent,
    apply_events,
    diff_reset,
)

__all__ = [
    "CasResult",
    "Compacted",
    "Delete",
    "KeyValue",
    "Lease",
    "LeaseNotFound",
    "Put",
    "Reset",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "WatchEvent",
    "apply_events",
    "diff_reset",
]
