"""Blobs in S3-compatible object storage: :class:`S3BlobBackend` (``s3://bucket/prefix``).

Objects under ``prefix``::

    <prefix>/blobs/<first 2 hex>/<64 hex>.safetensors    one committed blob (same name as on disk)
    <prefix>/manifests/v000012.json                      a copy of each version's manifest

Writes. A blob's digest is computed first (one pass over the encoder's byte parts, which are views
of the tensor: nothing is copied whole), then the bytes are uploaded under that name: one
``PutObject`` up to :data:`MULTIPART_THRESHOLD`, else a multipart upload whose parts are cut from
the same views (:data:`PART_BYTES` at a time, never the whole blob in a second buffer). Both carry
``If-None-Match: *``: an object store that already holds the name answers ``PreconditionFailed``
and the write is a no-op (a second writer of the same content-addressed blob loses nothing). A
multipart upload that is not completed is never visible; a failed one is aborted, and ``gc`` aborts
the ones a crashed writer left. An object is durable once its upload has completed, so
:meth:`S3BlobBackend.publish` and :meth:`S3BlobBackend.sync` have nothing left to do.

Reads. :meth:`S3BlobBackend.open_read` returns a seekable reader: a blob already in the local
read-through cache is a local file; a blob up to :attr:`S3BlobBackend.cache_blob_max` is downloaded
whole into the cache while its sha256 is checked (a mismatch is a :class:`CorruptBlobError` and
nothing is cached); a larger blob is read by HTTP ranges as it arrives
(:class:`~fedmerge.store.s3_ranges.RangeReader`: the first ranged GET's body streams straight into
the reader's buffers, no copy of the blob held). Either way the store's readers hash every byte
they use, so bytes changed in the bucket are refused. The cache holds at most ``cache_bytes`` (least
recently used blobs evicted first).

Retries. Every request goes through botocore's retry handler (``adaptive`` mode: exponential
back-off with jitter on 5xx, ``SlowDown``/throttling and connection errors, ``max_attempts``
tries). What is still failing afterwards becomes one :class:`ObjectStoreError` line naming the
bucket, the endpoint and what to check (unreachable, wrong credentials, no such bucket).

gc rule. ``gc`` deletes an unreferenced blob only when its ``LastModified`` is older than the grace
period, and sweeps inside the catalog's writer lock; a commit re-checks every blob it references
inside that same lock and uploads again any that is gone. A blob a commit reuses but does not
upload keeps its old age, so it may be deleted while the commit is still writing its other blobs:
the re-check then uploads it again (whole commits) or refuses the commit with a retryable
:class:`~fedmerge.store.errors.MissingBlobError` (streamed commits, whose bytes were not kept).
With a PostgreSQL catalog the writer lock is shared by every server, so the rule holds across them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fedmerge.store.blobs import _DIGEST, BlobReader, Buffer, StagedBlob
from fedmerge.store.errors import CorruptBlobError, MissingBlobError
from fedmerge.store.s3_client import (
    ObjectStoreError,
    S3Location,
    default_cache_dir,
    error_code,
    is_missing,
    make_client,
    server_time,
)
from fedmerge.store.s3_ranges import READ_AHEAD, STREAM_BUFFER, RangeReader, release_body

MULTIPART_THRESHOLD = 16 << 20
"""Blobs larger than this are uploaded in parts."""
PART_BYTES = 16 << 20
"""Bytes per multipart part (S3's minimum is 5 MiB, except the last)."""
DEFAULT_CACHE_BYTES = 2 << 30
INTAKE_SPOOL = "intake/spool"
"""Where, under the store's prefix, ``serve-continual`` replicas keep acknowledged experts' bytes
(``<prefix>/intake/spool/<sha256>``, :mod:`fedmerge.service.replicas`); ``gc`` sweeps it."""


class S3BlobBackend:
    """:class:`~fedmerge.store.blobs.BlobBackend` on an S3-compatible bucket (see the module doc).

    ``cache_dir`` holds the read-through cache (``blobs/``) and local temporary files (``tmp/``).
    """

    tmp_dir: Path
    read_threads: int | None = 16
    """Threads an export reads blobs with. A reading thread mostly waits on the network (each GET's
    first byte, then the stream): more of them than CPUs keep the link busy, and with one per blob
    of a model of up to 16 tensors every GET is in flight at once, as in a plain boto3
    ``download_file`` (10 threads on 8 MiB parts). Measured on 2 CPUs, 64 MiB in 16 blobs: 16
    threads beat 8 and 4 (bench/RESULTS.md, S3 section)."""
    read_chunk_bytes: int = 512 << 10
    """Bytes an export moves per step when it copies a blob of this backend (by ranges: received
    from the socket, hashed, written). Half the local chunk: the step's bytes are still in the CPU's
    cache when they are hashed and written (measured: less CPU per byte than 1 MiB or 4 MiB steps)."""

    def __init__(
        self,
        url: str,
        cache_dir: Path,
        *,
        endpoint: str | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_attempts: int = 8,
        client: Any = None,
    ) -> None:
        self.loc = S3Location.parse(url)
        self.endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
        self.client = client if client is not None else make_client(self.endpoint, max_attempts)
        self.root = Path(cache_dir)
        self.blob_dir = self.root / "blobs"  # the read-through cache
        self.tmp_dir = self.root / "tmp"  # both created on first use (the store creates its layout)
        self.cache_bytes = cache_bytes
        self.cache_blob_max = max(0, cache_bytes // 8)
        self._listing: dict[str, tuple[int, float]] = {}
        self.listed_at = 0.0
        """The object store's clock (:func:`server_time`) when :meth:`digests` last listed the blobs."""
        self._cache_lock = threading.Lock()

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        endpoint: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_attempts: int = 8,
    ) -> S3BlobBackend:
        """The backend of ``url`` after checking that its bucket answers (else one-line
        :class:`ObjectStoreError`); ``cache_dir`` defaults to :func:`default_cache_dir`."""
        loc = S3Location.parse(url)
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir(loc, endpoint)
        backend = cls(url, root, endpoint=endpoint, cache_bytes=cache_bytes, max_attempts=max_attempts)
        backend.check()
        return backend

    # -- errors ----------------------------------------------------------------------------------

    def _fail(self, exc: BaseException, doing: str) -> ObjectStoreError:
        code = error_code(exc)
        where = f"{self.loc} at {self.endpoint or 'AWS'}"
        if code in {"NoSuchBucket"}:
            hint = "the bucket does not exist: create it, or fix the s3:// URL"
        elif code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"}:
            hint = (
                f"the object store refused the credentials ({code}): check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or the profile, and the bucket's permissions"
            )
        elif code:
            hint = f"the object store answered {code} after retries with back-off"
        else:
            hint = (
                f"the object store is unreachable ({type(exc).__name__}) after retries with back-off: "
                "check --s3-endpoint / AWS_ENDPOINT_URL and that the server is running"
            )
        return ObjectStoreError(f"{doing} on {where}: {hint}")

    def check(self) -> None:
        """Fail fast with one clear line if the bucket cannot be reached or read."""
        try:
            self.client.head_bucket(Bucket=self.loc.bucket)
        except Exception as exc:
            if error_code(exc) in {"404", "NoSuchBucket", "NotFound"}:
                raise ObjectStoreError(
                    f"bucket {self.loc.bucket!r} does not exist at {self.endpoint or 'AWS'}: create it "
                    "(aws s3 mb s3://BUCKET) or fix the s3:// URL"
                ) from None
            raise self._fail(exc, "opening the store") from None

    # -- names -----------------------------------------------------------------------------------

    def key(self, digest: str) -> str:
        if not _DIGEST.match(digest):
            raise MissingBlobError(f"{digest!r} is not a sha256 hex digest; the manifest is damaged")
        return self.loc.key("blobs", digest[:2], f"{digest}.safetensors")

    def local_path(self, digest: str) -> Path:
        """Where the blob sits in the read-through cache (it may not be there)."""
        self.key(digest)
        return self.blob_dir / digest[:2] / f"{digest}.safetensors"

    def describe(self, digest: str) -> str:
        return f"s3://{self.loc.bucket}/{self.key(digest)}"

    # -- writing ---------------------------------------------------------------------------------

    def has(self, digest: str) -> bool:
        try:
            self.client.head_object(Bucket=self.loc.bucket, Key=self.key(digest))
        except Exception as exc:
            if is_missing(exc):
                return False
            raise self._fail(exc, f"looking up blob {digest}") from None
        return True

    def put(self, digest: str, parts: Sequence[Buffer]) -> bool:
        """Upload ``parts`` under ``digest`` unless the bucket holds it already (then False)."""
        views = [memoryview(p).cast("B") for p in parts]
        total = sum(v.nbytes for v in views)
        key = self.key(digest)
        try:
            if total <= MULTIPART_THRESHOLD:
                body = b"".join(views) if len(views) != 1 else views[0].tobytes()
                self.client.put_object(Bucket=self.loc.bucket, Key=key, Body=body, IfNoneMatch="*")
            else:
                self._multipart(key, _chunks(views, PART_BYTES))
        except Exception as exc:
            if error_code(exc) == "PreconditionFailed":
                return False
            if isinstance(exc, ObjectStoreError):
                raise
            raise self._fail(exc, f"uploading blob {digest}") from None
        return True

    def _multipart(self, key: str, parts: Iterable[bytes | memoryview]) -> None:
        """Upload ``parts`` (each but the last at least 5 MiB) as one object, conditionally."""
        upload = self.client.create_multipart_upload(Bucket=self.loc.bucket, Key=key)
        upload_id = upload["UploadId"]
        done: list[dict[str, Any]] = []
        try:
            for number, chunk in enumerate(parts, start=1):
                answer = self.client.upload_part(
                    Bucket=self.loc.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                )
                done.append({"ETag": answer["ETag"], "PartNumber": number})
            self.client.complete_multipart_upload(
                Bucket=self.loc.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": done},
                IfNoneMatch="*",
            )
        except BaseException:
            with contextlib.suppress(Exception):  # else gc aborts the upload left behind
                self.client.abort_multipart_upload(Bucket=self.loc.bucket, Key=key, UploadId=upload_id)
            raise

    def stage(self, parts: Sequence[Buffer]) -> StagedBlob:
        """Hash ``parts`` and upload them (a no-op if the blob exists): durable once this returns."""
        hasher = hashlib.sha256()
        for p in parts:
            hasher.update(memoryview(p).cast("B"))
        digest = hasher.hexdigest()
        self.put(digest, parts)
        return StagedBlob(digest, None, self.local_path(digest))

    def publish(self, staged: Sequence[StagedBlob]) -> None:
        """Nothing left to do: :meth:`stage` completed each upload."""

    def sync(self) -> None:
        """Nothing left to do: a completed upload is durable in the object store."""

    # -- reading ---------------------------------------------------------------------------------

    def size(self, digest: str) -> int:
        return self._stat(digest)[0]

    def mtime(self, digest: str) -> float:
        return self._stat(digest)[1]

    def _stat(self, digest: str) -> tuple[int, float]:
        if digest in self._listing:
            return self._listing[digest]
        try:
            head = self.client.head_object(Bucket=self.loc.bucket, Key=self.key(digest))
        except Exception as exc:
            if is_missing(exc):
                raise MissingBlobError(f"blob {digest} is missing from {self.loc}") from None
            raise self._fail(exc, f"looking up blob {digest}") from None
        return int(head["ContentLength"]), head["LastModified"].timestamp()

    def digests(self) -> Iterator[str]:
        """Every blob in the bucket (its size and age remembered for :meth:`size` and :meth:`mtime`)."""
        listing: dict[str, tuple[int, float]] = {}
        for obj in self._list(self.loc.key("blobs") + "/"):
            name = obj["Key"].rsplit("/", 1)[-1].removesuffix(".safetensors")
            if _DIGEST.match(name) and obj["Key"] == self.key(name):
                listing[name] = (int(obj["Size"]), obj["LastModified"].timestamp())
        self._listing = listing
        yield from sorted(listing)

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under ``prefix``; :attr:`listed_at` is set to the server's clock at the end."""
        newest = 0.0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.loc.bucket, Prefix=prefix
            ):
                for obj in page.get("Contents", []):
                    newest = max(newest, obj["LastModified"].timestamp())
                    yield obj
                self.listed_at = server_time(page, newest)
        except Exception as exc:
            raise self._fail(exc, "listing blobs") from None

    def stray_paths(self) -> list[str]:
        """Objects under ``blobs/`` whose key is not a blob name (never written by the store)."""
        out = []
        for obj in self._list(self.loc.key("blobs") + "/"):
            name = obj["Key"].rsplit("/", 1)[-1].removesuffix(".safetensors")
            if not (_DIGEST.match(name) and obj["Key"] == self.key(name)):
                out.append(f"s3://{self.loc.bucket}/{obj['Key']}")
        return out

    def leftover_tmp(self, older_than: float | None = None) -> list[Path]:
        now = time.time()
        if not self.tmp_dir.is_dir():
            return []
        return [
            p
            for p in sorted(self.tmp_dir.iterdir())
            if older_than is None or now - p.stat().st_mtime >= older_than
        ]

    def incomplete_uploads(self, older_than: float) -> tuple[list[tuple[str, str]], int]:
        """Multipart uploads under ``blobs/`` and the intake's spool: ((key, upload id) of those
        initiated at least ``older_than`` s ago, how many younger ones were kept). Ages are the
        object store's own: its clock (the listing's ``Date``) minus each upload's ``Initiated``."""
        old: list[tuple[str, str]] = []
        young = 0
        for prefix in (self.loc.key("blobs") + "/", self.loc.key(INTAKE_SPOOL) + "/"):
            marker: dict[str, str] = {}
            while True:
                try:
                    answer = self.client.list_multipart_uploads(
                        Bucket=self.loc.bucket, Prefix=prefix, **marker
                    )
                except Exception as exc:
                    raise self._fail(exc, "listing multipart uploads") from None
                uploads = answer.get("Uploads", [])
                now = server_time(answer, *(u["Initiated"].timestamp() for u in uploads))
                for u in uploads:
                    if now - u["Initiated"].timestamp() >= older_than:
                        old.append((u["Key"], u["UploadId"]))
                    else:
                        young += 1
                if not answer.get("IsTruncated"):
                    break
                marker = {
                    "KeyMarker": answer.get("NextKeyMarker", ""),
                    "UploadIdMarker": answer.get("NextUploadIdMarker", ""),
                }
        return old, young

    def spool_objects(self) -> tuple[list[tuple[str, int, float]], float]:
        """((sha256, size, LastModified) of every object in the intake's spool, the server's clock at
        the end of the listing)."""
        found = []
        for obj in self._list(self.loc.key(INTAKE_SPOOL) + "/"):
            name = obj["Key"].rsplit("/", 1)[-1]
            if _DIGEST.match(name) and obj["Key"] == self.loc.key(INTAKE_SPOOL, name):
                found.append((name, int(obj["Size"]), obj["LastModified"].timestamp()))
        return found, self.listed_at

    def has_object(self, name: str) -> bool:
        """Whether ``<prefix>/<name>`` exists."""
        try:
            self.client.head_object(Bucket=self.loc.bucket, Key=self.loc.key(name))
        except Exception as exc:
            if is_missing(exc):
                return False
            raise self._fail(exc, f"looking up {name}") from None
        return True

    def delete_object(self, name: str) -> None:
        """Delete ``<prefix>/<name>`` (absent already: nothing to do)."""
        try:
            self.client.delete_object(Bucket=self.loc.bucket, Key=self.loc.key(name))
        except Exception as exc:
            raise self._fail(exc, f"deleting {name}") from None

    def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.loc.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:
            raise self._fail(exc, f"aborting the upload of {key}") from None

    def delete(self, digest: str) -> None:
        try:
            self.client.delete_object(Bucket=self.loc.bucket, Key=self.key(digest))
        except Exception as exc:
            raise self._fail(exc, f"deleting blob {digest}") from None
        self.local_path(digest).unlink(missing_ok=True)
        self._listing.pop(digest, None)

    def open_read(self, digest: str, what: str) -> tuple[BlobReader, int]:
        """(reader, size) of the blob: a cached file, a whole download into the cache, or by ranges."""
        cached = self.local_path(digest)
        try:
            fh = cached.open("rb", buffering=0)
        except FileNotFoundError:
            pass
        else:
            os.utime(cached)  # least recently used is evicted first
            return fh, os.fstat(fh.fileno()).st_size
        try:  # the first bytes and the size in one request (no separate HEAD)
            first = self.client.get_object(
                Bucket=self.loc.bucket, Key=self.key(digest), Range=f"bytes=0-{READ_AHEAD - 1}"
            )
        except Exception as exc:
            if is_missing(exc):
                raise MissingBlobError(
                    f"{what}: blob {digest} is missing from {self.loc}; restore it from a backup or an "
                    "export — the store never deletes referenced blobs, so something outside it did"
                ) from None
            if error_code(exc) == "InvalidRange":  # an empty object
                return io.BufferedReader(self._ranges(digest, 0)), 0
            raise self._fail(exc, f"{what}: reading blob {digest}") from None
        body = first["Body"]
        length = int(first.get("ContentLength") or 0)
        content_range = str(first.get("ContentRange") or "")
        size = int(content_range.rsplit("/", 1)[1]) if "/" in content_range else length
        if size <= self.cache_blob_max:
            if length == size:
                try:
                    head = bytes(body.read())
                except Exception as exc:
                    raise self._fail(exc, f"{what}: reading blob {digest}") from None
                finally:
                    release_body(body)
                self._cache_bytes(digest, head, cached, what)
            else:
                release_body(body)
                self._download(digest, cached, what)
            fh = cached.open("rb", buffering=0)
            return fh, size
        # read as it arrives: the first answer's stream serves the first bytes, later ones by ranges
        return io.BufferedReader(self._ranges(digest, size, body, length), STREAM_BUFFER), size

    def _ranges(self, digest: str, size: int, body: Any = None, length: int = 0) -> RangeReader:
        key = self.key(digest)
        return RangeReader(
            self.client, self.loc.bucket, key, size, lambda exc, doing: self._fail(exc, doing), body, length
        )

    def _cache_bytes(self, digest: str, data: bytes, dest: Path, what: str) -> None:
        """Put a blob fetched whole into the cache, checking its sha256 (nothing cached on a mismatch)."""
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise CorruptBlobError(
                f"{what}: blob {digest} is corrupted in {self.loc} (its bytes hash to {actual}); "
                "restore it from a backup — the store does not repair it"
            )
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{secrets.token_hex(8)}.download"
        tmp.write_bytes(data)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        self._evict(keep=dest)

    def _download(self, digest: str, dest: Path, what: str) -> None:
        """Download a whole blob into the cache, checking its sha256 (nothing cached on a mismatch)."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{secrets.token_hex(8)}.download"
        hasher = hashlib.sha256()
        try:
            body = self.client.get_object(Bucket=self.loc.bucket, Key=self.key(digest))["Body"]
            with tmp.open("wb") as out:
                for chunk in body.iter_chunks(1 << 20):
                    hasher.update(chunk)
                    out.write(chunk)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise self._fail(exc, f"{what}: downloading blob {digest}") from None
        if hasher.hexdigest() != digest:
            tmp.unlink(missing_ok=True)
            raise CorruptBlobError(
                f"{what}: blob {digest} is corrupted in {self.loc} (its bytes hash to {hasher.hexdigest()}); "
                "restore it from a backup — the store does not repair it"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        self._evict(keep=dest)

    def _evict(self, keep: Path) -> None:
        with self._cache_lock:
            files = []
            total = 0
            for path in self.blob_dir.glob("*/*.safetensors"):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, path))
                total += st.st_size
            for _, size, path in sorted(files):
                if total <= self.cache_bytes:
                    break
                if path != keep:
                    path.unlink(missing_ok=True)
                    total -= size

    def hash_blob(self, digest: str) -> tuple[str, int]:
        """(sha256 of the bytes in the bucket, size), streamed (the cache is not trusted for this)."""
        hasher = hashlib.sha256()
        size = 0
        try:
            body = self.client.get_object(Bucket=self.loc.bucket, Key=self.key(digest))["Body"]
            for chunk in body.iter_chunks(1 << 20):
                hasher.update(chunk)
                size += len(chunk)
        except Exception as exc:
            raise self._fail(exc, f"hashing blob {digest}") from None
        return hasher.hexdigest(), size

    # -- other named objects (the intake's spool) ----------------------------------------------------

    def put_file(self, name: str, path: Path) -> bool:
        """Upload the file at ``path`` as ``<prefix>/<name>`` unless the bucket holds it (then False).

        Conditional like :meth:`put` (``If-None-Match: *``); a large file goes up in parts read one at
        a time (never the whole file in memory); durable in the bucket once this returns."""
        key = self.loc.key(name)
        with path.open("rb") as fh:  # an OSError here is the local file's, not the object store's
            size = os.fstat(fh.fileno()).st_size
            try:
                if size <= MULTIPART_THRESHOLD:
                    self.client.put_object(Bucket=self.loc.bucket, Key=key, Body=fh.read(), IfNoneMatch="*")
                else:  # one part in memory at a time
                    self._multipart(key, iter(lambda: fh.read(PART_BYTES), b""))
            except Exception as exc:
                if error_code(exc) == "PreconditionFailed":
                    return False
                raise self._fail(exc, f"uploading {name}") from None
        return True

    def fetch_file(self, name: str, dest: Path, sha256: str) -> None:
        """Download ``<prefix>/<name>`` to ``dest`` (atomically), checking that its bytes hash to
        ``sha256``: :class:`CorruptBlobError` (nothing written) if they do not, :class:`MissingBlobError`
        if the object is absent."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.download"
        hasher = hashlib.sha256()
        try:
            body = self.client.get_object(Bucket=self.loc.bucket, Key=self.loc.key(name))["Body"]
            with tmp.open("wb") as out:
                for chunk in body.iter_chunks(1 << 20):
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            if is_missing(exc):
                raise MissingBlobError(f"s3://{self.loc.bucket}/{self.loc.key(name)} is missing") from None
            raise self._fail(exc, f"downloading {name}") from None
        if hasher.hexdigest() != sha256:
            tmp.unlink(missing_ok=True)
            raise CorruptBlobError(
                f"s3://{self.loc.bucket}/{self.loc.key(name)} hashes to {hasher.hexdigest()}, not "
                f"{sha256}: its bytes were changed in the bucket"
            )
        os.replace(tmp, dest)

    # -- manifests -------------------------------------------------------------------------------

    def put_manifest(self, name: str, data: bytes) -> None:
        """Keep a copy of a manifest in the bucket (an interrupted commit's copy is overwritten)."""
        try:
            self.client.put_object(Bucket=self.loc.bucket, Key=self.loc.key("manifests", name), Body=data)
        except Exception as exc:
            raise self._fail(exc, f"uploading manifest {name}") from None

    def holds_manifests(self) -> bool:
        """Whether any manifest is under ``<prefix>/manifests/`` (a store was committed to here)."""
        try:
            answer = self.client.list_objects_v2(
                Bucket=self.loc.bucket, Prefix=self.loc.key("manifests") + "/", MaxKeys=1
            )
        except Exception as exc:
            raise self._fail(exc, "listing manifests") from None
        return bool(answer.get("Contents"))

    def manifest_copies(self) -> tuple[list[tuple[str, int, float]], float]:
        """((file name, size, LastModified) of every object under ``<prefix>/manifests/``, the server's
        clock at the end of the listing)."""
        prefix = self.loc.key("manifests") + "/"
        found = [
            (obj["Key"][len(prefix) :], int(obj["Size"]), obj["LastModified"].timestamp())
            for obj in self._list(prefix)
            if "/" not in obj["Key"][len(prefix) :]
        ]
        return found, self.listed_at

    def manifest_url(self, name: str) -> str:
        return f"s3://{self.loc.bucket}/{self.loc.key('manifests', name)}"

    def delete_manifest(self, name: str) -> None:
        """Delete the copy of manifest ``name`` (absent already: nothing to do)."""
        self.delete_object(f"manifests/{name}")

    def get_manifest(self, name: str) -> bytes | None:
        try:
            body = self.client.get_object(Bucket=self.loc.bucket, Key=self.loc.key("manifests", name))["Body"]
            return bytes(body.read())
        except Exception as exc:
            if is_missing(exc):
                return None
            raise self._fail(exc, f"downloading manifest {name}") from None


def _chunks(views: Sequence[memoryview], size: int) -> Iterator[bytes | memoryview]:
    """The concatenation of ``views`` cut into pieces of ``size`` bytes (the last one shorter); a piece
    inside one view is handed out as bytes of that slice only, so at most one part is ever copied."""
    pending: list[memoryview] = []
    have = 0
    for view in views:
        start = 0
        while start < view.nbytes:
            take = min(size - have, view.nbytes - start)
            pending.append(view[start : start + take])
            have += take
            start += take
            if have == size:
                yield b"".join(pending)
                pending, have = [], 0
    if pending:
        yield b"".join(pending)
