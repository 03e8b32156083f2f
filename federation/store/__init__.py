"""The federation store: one async interface (``api.Store``), etcd and embedded backends.

Open one with :func:`open_store` (``memory://`` or ``etcd://host:port``); see docs/store.md.
"""

import importlib
from typing import TYPE_CHECKING, Any

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
    StoreClosed,
    StoreError,
    StoreUnavailable,
    WatchEvent,
    apply_events,
    diff_reset,
)
from federation.store.embedded import EmbeddedStore, open_embedded_store

if TYPE_CHECKING:
    from federation.store.etcd import EtcdConfig, EtcdStore, open_etcd_store
    from federation.store.open import InvalidStoreURL, open_store, parse_store_url

# The etcd backend imports grpc (and asyncio), ~10 MB of RSS: loaded on first use, so
# that a process which only needs the store's types (a sidecar) never pays for it.
_LAZY = {
    "EtcdConfig": "federation.store.etcd",
    "EtcdStore": "federation.store.etcd",
    "open_etcd_store": "federation.store.etcd",
    "InvalidStoreURL": "federation.store.open",
    "open_store": "federation.store.open",
    "parse_store_url": "federation.store.open",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "CasResult",
    "Compacted",
    "Delete",
    "EmbeddedStore",
    "EtcdConfig",
    "EtcdStore",
    "InvalidStoreURL",
    "KeyValue",
    "Lease",
    "LeaseNotFound",
    "Put",
    "Reset",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoreUnavailable",
    "WatchEvent",
    "apply_events",
    "diff_reset",
    "open_embedded_store",
    "open_etcd_store",
    "open_store",
    "parse_store_url",
]
