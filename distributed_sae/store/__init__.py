"""The zarr activation store (layout, commits, writer lock, integrity checks) and the batch
reader."""

from distributed_sae.store.activation_store import ActivationStore, from_storage, to_storage
from distributed_sae.store.commits import StoreLockedError, WriterLock, commit_unit
from distributed_sae.store.integrity import Damage, StoreDamagedError
from distributed_sae.store.reader import ActivationReader, split_rows

__all__ = [
    "ActivationReader", "ActivationStore", "Damage", "StoreDamagedError", "StoreLockedError",
    "WriterLock", "commit_unit", "from_storage", "split_rows", "to_storage",
]
