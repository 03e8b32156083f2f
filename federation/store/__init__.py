"""The federation store: one async interface (``api.Store``), etcd and embedded backends.

Open one with :func:`open_store` (``memory://`` or ``etcd://host:port``); see docs/store.md.
"""

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
from federation.store.etcd import EtcdConfig, EtcdStore, open_etcd_store
from federation.store.open import InvalidStoreURL, open_store, parse_store_url

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
