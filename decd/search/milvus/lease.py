"""One writer per collection on a Milvus server: the lease a build holds while it writes, a small collection
`decd_lease_<collection>` (docs/milvus.md, "One build at a time"; Milvus Lite needs none)."""

from __future__ import annotations

import contextlib
import datetime
import getpass
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

from ..display import display_path
from ..errors import MilvusStoreError
from .store import MilvusCollection, import_pymilvus, json_property

LEASE_SECONDS = 60.0  # a lease not renewed for this long is stale: its build no longer runs
RENEW_SECONDS = 15.0  # how often a running build renews its lease
LEASE_PROPERTY = "decd.lease"
LEASE_PREFIX = "decd_lease_"


def lease_name(collection: str) -> str:
    """The lease collection of `collection`: a valid Milvus name (at most 255 characters) of its own."""
    name = LEASE_PREFIX + collection
    return name if len(name) <= 255 else f"{name[:230]}_{hashlib.sha256(collection.encode()).hexdigest()[:20]}"


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


class CollectionLease:
    """The lease of one build on `collection` (docs/milvus.md): `acquire` takes it or raises
    MilvusStoreError naming the build that holds it (nothing changed); `check` raises if it was lost (its expiry
    passed without a renewal, or another build took it over); `release` drops it (when it is still this build's).

    `renew=False` takes it without renewing it (as a build that was killed right after taking it: for tests).
    """

    def __init__(self, collection: MilvusCollection, gallery_dir: str, seconds: float = LEASE_SECONDS,
                 renew: bool = True):
        self.collection = collection
        self.lease = MilvusCollection(collection.client, collection.location, lease_name(collection.name))
        self.seconds, self.renews = float(seconds), renew
        self.token = uuid.uuid4().hex
        self.record = dict(token=self.token, user=getpass.getuser(), host=socket.gethostname(), pid=os.getpid(),
                           gallery_dir=str(gallery_dir), started=time.time(), expires=0.0)
        self.lost: Optional[str] = None  # why the lease was lost, once it is
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _read(self) -> Optional[dict]:
        """The lease record in Milvus, or None when there is no lease ({} for one no build wrote)."""
        if not self.lease.exists():
            return None
        try:
            record = json_property(self.lease.describe(), LEASE_PROPERTY)
        except MilvusStoreError:
            return None  # dropped meanwhile
        return record if isinstance(record, dict) and isinstance(record.get("token"), str) else {}

    def describe(self, record: dict) -> str:
        """'pid 123 of alice on host-1, gallery /data/crops, started ..., lease valid until ...'."""
        return (f"pid {record.get('pid')} of {record.get('user')} on {record.get('host')}, gallery "
                f"{display_path(str(record.get('gallery_dir')))!r}, started {_when(float(record.get('started') or 0))}"
                f", its lease valid until {_when(float(record.get('expires') or 0))}")

    def acquire(self) -> "CollectionLease":
        for _ in range(5):
            if (record := self._read()) is not None:
                if record == {}:
                    raise MilvusStoreError(f"{self.lease.where} exists and is not a decd-search lease; nothing was "
                                           f"changed: drop it, or choose another --collection")
                if float(record.get("expires") or 0) > time.time():
                    raise MilvusStoreError(f"{self.collection.where} is being written by another build "
                                           f"({self.describe(record)}); nothing was changed: wait for it to end, or, "
                                           "if that process is gone, run again once its lease has expired")
                # A stale lease (its build was killed): dropped if it is still that one, then taken.
                if (self._read() or {}).get("token") == record["token"]:
                    self.lease.call("dropping a stale lease", "drop_collection")
                continue
            self.record["expires"] = time.time() + self.seconds
            if self._create() and (self._read() or {}).get("token") == self.token:
                if self.renews:
                    self._thread = threading.Thread(target=self._renew, name=f"lease {self.lease.name}", daemon=True)
                    self._thread.start()
                return self
        raise MilvusStoreError(f"could not take the lease of {self.collection.where}: other builds kept taking it; "
                               f"run again")

    def _create(self) -> bool:
        """Create the lease collection holding this record; False when the server refuses (another build's exists)."""
        pymilvus = import_pymilvus(self.lease.location.uri)
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                                     description=f"decd-search build lease {self.token}")
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("unused", pymilvus.DataType.FLOAT_VECTOR, dim=2)  # a collection needs a vector field
        try:
            self.lease.create(schema, {LEASE_PROPERTY: json.dumps(self.record)})
            return True
        except MilvusStoreError:
            return False

    def _renew(self) -> None:
        """The renewal thread: push the expiry forward every RENEW_SECONDS while the lease is still this build's."""
        while not self._stop.wait(min(RENEW_SECONDS, self.seconds / 3)):
            try:
                if (current := self._read()) is None or current.get("token") != self.token:
                    self.lost = (f"another build took it over ({self.describe(current)})" if current
                                 else "it was dropped by another process")
                    return
                expires = time.time() + self.seconds
                self.lease.set_property("renewing the lease", LEASE_PROPERTY, dict(self.record, expires=expires))
                self.record["expires"] = expires
            except MilvusStoreError:
                continue  # the server did not answer: tried again; `check` fails once the expiry has passed

    def check(self) -> None:
        """Raise MilvusStoreError when this build no longer holds the lease: it must not write any more."""
        if self.lost is None and time.time() >= float(self.record["expires"]):
            self.lost = f"it expired at {_when(float(self.record['expires']))} without a renewal"
        if self.lost is not None:
            raise MilvusStoreError(f"this build lost its lease on {self.collection.where} ({self.lost}) and stopped "
                                   f"writing; run it again")

    def release(self) -> None:
        """Stop renewing and drop the lease if it is still this build's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with contextlib.suppress(MilvusStoreError):  # the server went away: the lease expires on its own
            if (self._read() or {}).get("token") == self.token:
                self.lease.call("dropping the lease", "drop_collection")
