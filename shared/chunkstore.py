"""Where chunk blobs (inputs, results, row errors) live: in Redis beside the job, or in object storage.

The job store keeps one value per chunk in its Redis hashes; a chunk store turns a blob into that value
(`put`) and back (`get`). In Redis the value is the blob itself. With CHUNK_STORE_URL it is the blob's name in
object storage (`<job id>/<kind>/<index>[.<token>]` under the URL), so Redis holds state, queues, counters and
names, and the bytes go to the store. Every blob of a job lies under `<job id>/`, which `delete_job` removes.
"""
from __future__ import annotations

import os
import socket
import re
from collections.abc import Iterable
from typing import Protocol

import fsspec

from shared.errors import ChunkStoreUnavailable

_JOB_ID = re.compile(r"^job_[0-9a-z]{26}$")


class ChunkStore(Protocol):
    def put(self, name: str, data: bytes | memoryview) -> bytes | memoryview:
        """Store a blob under `name`; returns the value the job's Redis hash keeps for it."""

    def get(self, ref: bytes) -> bytes:
        """The blob a value from the job's Redis hash stands for."""

    def get_many(self, refs: list[bytes]) -> list[bytes]:
        """Several blobs at once, in the order asked."""

    def delete(self, refs: Iterable[bytes]) -> None:
        """Remove blobs; those already gone are ignored."""

    def delete_job(self, job_id: str, kind: str | None = None) -> None:
        """Remove every blob of a job (or of one kind: 'inputs', 'results', 'errors')."""

    def job_ids(self) -> list[str]:
        """Ids of the jobs that have blobs in the store."""

    def check(self) -> None:
        """Raise ChunkStoreUnavailable unless a blob can be written and read back now."""


class RedisBlobs:
    """Blobs kept in the job's Redis hashes: the value is the blob, and the hashes' own deletion removes it."""

    def put(self, name: str, data: bytes | memoryview) -> bytes | memoryview:
        return data

    def get(self, ref: bytes) -> bytes:
        return ref

    def get_many(self, refs: list[bytes]) -> list[bytes]:
        return refs

    def delete(self, refs: Iterable[bytes]) -> None:
        pass

    def delete_job(self, job_id: str, kind: str | None = None) -> None:
        pass

    def job_ids(self) -> list[str]:
        return []

    def check(self) -> None:
        pass  # Redis itself: readiness checks it


class FsspecBlobs:
    """Blobs as objects under an fsspec URL (file://, s3://, gs://, ...); Redis keeps their names.

    On a local filesystem a blob is written under a temporary name, flushed to disk and renamed, so a name
    never shows a half-written blob; object stores make a put visible whole by themselves.
    """

    def __init__(self, url: str):
        self.url = url
        fs, root = fsspec.core.url_to_fs(url)
        self._fs, self._pid = fs, os.getpid()
        self.root = root.rstrip("/")
        self.local = "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        # A client made before a fork (a preloaded web app, a worker's pool) must not be used after it.
        if self._pid != os.getpid():
            self._fs, self._pid = fsspec.core.url_to_fs(self.url)[0], os.getpid()
        return self._fs

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _unavailable(self, doing: str, e: Exception) -> ChunkStoreUnavailable:
        return ChunkStoreUnavailable(f"The chunk store {self.url} failed while {doing}: {type(e).__name__}: {e}")

    def put(self, name: str, data: bytes | memoryview) -> bytes | memoryview:
        path = self._path(name)
        try:
            if self.local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{os.urandom(4).hex()}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, bytes(data))
        except Exception as e:  # noqa: BLE001 - any failure of the store (network, permission, bucket) is one error
            raise self._unavailable(f"writing {name}", e) from e
        return name.encode()

    def get(self, ref: bytes) -> bytes:
        return self.get_many([ref])[0]

    def get_many(self, refs: list[bytes]) -> list[bytes]:
        if not refs:
            return []
        paths = [self._path(r.decode()) for r in refs]
        try:
            found = self.fs.cat(paths, on_error="return")
        except Exception as e:  # noqa: BLE001
            raise self._unavailable(f"reading {refs[0].decode()}", e) from e
        out = []
        for ref, path in zip(refs, paths):
            value = found.get(path)
            if isinstance(value, FileNotFoundError) or value is None:
                # A name Redis still holds but the store lost: a store not shared by every process, or a
                # job deleted while it was read.
                raise ChunkStoreUnavailable(f"The chunk store {self.url} has no blob {ref.decode()}; every web and "
                                            f"worker process must reach the same store.")
            if isinstance(value, Exception):
                raise self._unavailable(f"reading {ref.decode()}", value) from value
            out.append(value)
        return out

    def delete(self, refs: Iterable[bytes]) -> None:
        for ref in refs:
            if not ref:
                continue
            try:
                self.fs.rm_file(self._path(ref.decode()))  # one request; rm() would look each path up first
            except FileNotFoundError:
                pass
            except Exception as e:  # noqa: BLE001
                raise self._unavailable(f"deleting {ref.decode()}", e) from e

    def delete_job(self, job_id: str, kind: str | None = None) -> None:
        path = self._path(job_id if kind is None else f"{job_id}/{kind}")
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise self._unavailable(f"deleting the blobs of {job_id}", e) from e
        if not self.local:
            self.fs.invalidate_cache(path)

    def check(self) -> None:
        """Write a small object and read it back (ChunkStoreUnavailable when either fails): what every job needs."""
        name = f".predq-ready/{socket.gethostname()}-{os.getpid()}"  # not a job id: the sweep leaves it alone
        probe = os.urandom(8)
        if self.get(self.put(name, probe)) != probe:
            raise ChunkStoreUnavailable(f"The chunk store {self.url} gave back other bytes than were written.")

    def job_ids(self) -> list[str]:
        try:
            self.fs.invalidate_cache(self.root)
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        except Exception as e:  # noqa: BLE001
            raise self._unavailable("listing jobs", e) from e
        ids = (n.rstrip("/").rsplit("/", 1)[-1] for n in names)
        return sorted(i for i in ids if _JOB_ID.match(i))


def open_chunk_store(url: str | None) -> ChunkStore:
    """The chunk store CHUNK_STORE_URL names; Redis itself when it is unset."""
    return FsspecBlobs(url) if url else RedisBlobs()
