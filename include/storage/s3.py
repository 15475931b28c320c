"""S3 storage (AWS or any S3-compatible server): multipart uploads with parallel parts and bounded
memory, resumed from the parts already stored; downloads in parallel ranges.

Memory: at most ``concurrency + 1`` parts are held at once, and no more than ``MEMORY_BUDGET`` worth
of 8-32 MiB parts (fewer in flight as parts grow; a disk over about 1.2 TiB needs parts of 256 MiB,
and then two of them are held). An interrupted
upload is not aborted: the next attempt finds it with ListMultipartUploads, keeps every stored part
whose size and MD5 (its ETag) match what it is about to send, and uploads only the rest. Each
disk's sha256 is kept in a ``<key>.manifest.json`` object beside it.

Proxies: botocore's environment proxies (``HTTP_PROXY`` / ``HTTPS_PROXY``) are never used
(``Config(proxies={})``: botocore reads the environment only when ``proxies`` is None), as the address
policy checks what a socket connects to, and through a proxy that is only the proxy. A proxy is used
only when the Secret names one (key ``proxy``, ``http://host:port``); then the real target of every
request is checked against the address policy before it is sent (botocore's ``before-send`` event).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from include.diskio import CHUNK, Segment
from include.errors import InvalidMigration, StorageAuthError, StorageError
from include.inventory import Credentials
from include.spec import StorageSpec
from include.storage.base import MANIFEST_SUFFIX, ObjectWriter, StorageBackend
from include.storage.tls import tls_verify

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MIN_PART = 8 * MiB
#: parts held at once (in flight plus the one being filled) stay within this, down to one in flight
MEMORY_BUDGET = 160 * MiB
MAX_PARTS = 10_000
AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
              "XAdminUserNotFound", "403", "401"}


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach the bucket; built from the spec and its Secret, never logged whole."""

    bucket: str
    region: str
    endpoint_url: str | None
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    verify: bool | str = True
    #: an explicit proxy from the Secret's ``proxy`` key (may hold credentials: never logged)
    proxy: str | None = field(default=None, repr=False)

    @property
    def path_style(self) -> bool:
        return self.endpoint_url is not None


def settings_from(storage: StorageSpec, credentials: Credentials | None) -> S3Settings:
    """The guide's Secret keys accessKey/secretKey (or accessKeyID/secretAccessKey) and optional endpoint."""
    if credentials is None:
        raise InvalidMigration("S3 storage needs a credentials Secret", field="spec.storage.credentialsSecretRef")
    access = credentials.first("accessKey", "accessKeyID", "accessKeyId", "AWS_ACCESS_KEY_ID")
    secret = credentials.first("secretKey", "secretAccessKey", "AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        raise InvalidMigration(f"Secret {credentials.source} needs the keys accessKey and secretKey",
                               field="spec.storage.credentialsSecretRef")
    from include.storage.http import proxy_from, refuse_userinfo

    from_secret = credentials.first("endpoint")
    endpoint = from_secret or storage.endpoint
    refuse_userinfo(endpoint, field="spec.storage.credentialsSecretRef" if from_secret else "spec.storage.endpoint")
    if endpoint and endpoint.rstrip("/") in ("s3.amazonaws.com", "https://s3.amazonaws.com"):
        endpoint = None  # AWS itself: let botocore pick the regional endpoint
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"  # TLS unless the endpoint says otherwise
    verify = tls_verify(credentials, endpoint, "S3 endpoint")
    return S3Settings(bucket=storage.bucket or "", region=storage.region or "us-east-1", endpoint_url=endpoint,
                      access_key=access, secret_key=secret, verify=verify, proxy=proxy_from(credentials))


def boto3_client(settings: S3Settings) -> Any:
    """A plain boto3 client (the command line's path; the pipeline builds it through MigrationS3Hook)."""
    import boto3

    client = boto3.client("s3", region_name=settings.region, endpoint_url=settings.endpoint_url,
                          aws_access_key_id=settings.access_key, aws_secret_access_key=settings.secret_key,
                          verify=settings.verify, config=botocore_config(settings))
    return check_proxied_targets(client, settings)


def botocore_config(settings: S3Settings) -> Any:
    """Path-style for custom endpoints, bounded retries and timeouts, and no proxy from the environment:
    ``proxies`` is the Secret's ``proxy`` or ``{}`` (botocore asks the environment only when it is None)."""
    from botocore.config import Config

    proxies = {"http": settings.proxy, "https": settings.proxy} if settings.proxy else {}
    return Config(s3={"addressing_style": "path"} if settings.path_style else {},
                  retries={"max_attempts": 4, "mode": "standard"}, max_pool_connections=32,
                  connect_timeout=10, read_timeout=120, proxies=proxies,
                  request_checksum_calculation="when_required", response_checksum_validation="when_required")


def check_proxied_targets(client: Any, settings: S3Settings, policy: Any = None) -> Any:
    """With a proxy, check the real target of every request against the address policy before botocore
    sends it (the connect-time check sees only the proxy). Returns ``client``; idempotent."""
    if not settings.proxy:
        return client
    from include.netpolicy import AddressPolicy

    policy = policy or AddressPolicy.from_env()

    def check_target(request: Any, **_kwargs: Any) -> None:
        policy.check_endpoint(request.url, field="spec.storage.endpoint")

    client.meta.events.register("before-send.s3", check_target, unique_id="vmmigration-proxied-target-check")
    return client


def translate(err: BaseException, what: str) -> Exception:
    """botocore errors as engine errors: wrong credentials are permanent, the rest transient (any
    ``user:password@`` in a URL the error quotes is redacted)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from include.endpoints import redact_text
    from include.netpolicy import refusal_in

    refused = refusal_in(err)
    if refused is not None:
        return refused
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in AUTH_CODES or status in ("401", "403"):
            return StorageAuthError(f"Storage authentication failed: {what}: {code or status}",
                                    field="spec.storage.credentialsSecretRef")
        if code == "NoSuchBucket":
            return InvalidMigration(f"bucket does not exist ({what})", field="spec.storage.bucket")
        return StorageError(redact_text(f"{what}: {code} {err}"))
    if isinstance(err, BotoCoreError):
        return StorageError(redact_text(f"{what}: {err}"))
    return StorageError(redact_text(f"{what}: {type(err).__name__}: {err}"))


def part_size_for(size_hint: int) -> int:
    """At least 8 MiB, and large enough that the disk fits in 10,000 parts."""
    needed = -(-max(size_hint, 1) // (MAX_PARTS - 10))
    size = MIN_PART
    while size < needed:
        size *= 2
    return size


class _MultipartWriter(ObjectWriter):
    def __init__(self, storage: S3Storage, key: str, part_size: int) -> None:
        self.s = storage
        self.key = key
        self.part_size = part_size
        self.chunks: list[memoryview] = []
        self.buffered = 0
        self.next_part = 1
        self.upload_id: str | None = None
        self.existing: dict[int, tuple[int, str]] = {}
        self.done: dict[int, str] = {}
        self.pending: deque[Future] = deque()
        self.length = 0
        self.reused = 0
        self.sent = 0
        self.max_inflight = max(1, min(storage.concurrency, MEMORY_BUDGET // part_size - 1))
        self._lock = threading.Lock()

    # A part is only sent once its buffer is full, so the first part tells whether the object is small.
    # Chunks are kept as they come and joined once per part (one copy), not appended to a growing buffer.
    def write(self, segment: Segment) -> None:
        if segment.data is not None:
            self._add(segment.data)
        else:
            left = segment.length
            while left:
                n = min(left, CHUNK)
                self._add(bytes(n))
                left -= n
        self.length += segment.length

    def _add(self, data: bytes | memoryview) -> None:
        if not self.chunks and isinstance(data, bytes) and len(data) == self.part_size:
            self._submit(data)  # a read that is exactly one part goes out without a copy
            return
        view = memoryview(data)
        while view:
            room = self.part_size - self.buffered
            piece = view[:room]
            self.chunks.append(piece)
            self.buffered += len(piece)
            view = view[len(piece):]
            if self.buffered == self.part_size:
                part = b"".join(self.chunks)
                self.chunks, self.buffered = [], 0
                self._submit(part)

    def _begin(self) -> None:
        if self.upload_id is not None:
            return
        client = self.s.client
        try:
            uploads = client.list_multipart_uploads(Bucket=self.s.bucket, Prefix=self.key).get("Uploads", [])
            uploads = [u for u in uploads if u["Key"] == self.key]
            uploads.sort(key=lambda u: u["Initiated"])
            for stale in uploads[:-1]:
                client.abort_multipart_upload(Bucket=self.s.bucket, Key=self.key, UploadId=stale["UploadId"])
            if uploads:
                upload_id = uploads[-1]["UploadId"]
                parts: dict[int, tuple[int, str]] = {}
                paginator = client.get_paginator("list_parts")
                for page in paginator.paginate(Bucket=self.s.bucket, Key=self.key, UploadId=upload_id):
                    for p in page.get("Parts", []):
                        parts[p["PartNumber"]] = (p["Size"], p["ETag"].strip('"'))
                if parts and parts.get(1, (self.part_size,))[0] != self.part_size:
                    client.abort_multipart_upload(Bucket=self.s.bucket, Key=self.key, UploadId=upload_id)
                else:
                    self.upload_id, self.existing = upload_id, parts
                    log.info("resuming upload of %s: %d parts already stored", self.key, len(parts))
                    return
            self.upload_id = client.create_multipart_upload(Bucket=self.s.bucket, Key=self.key)["UploadId"]
        except Exception as err:
            raise translate(err, f"starting the upload of s3://{self.s.bucket}/{self.key}") from err

    def _submit(self, data: bytes) -> None:
        self._begin()
        number = self.next_part
        if number > MAX_PARTS:
            raise InvalidMigration(f"s3://{self.s.bucket}/{self.key} needs more than {MAX_PARTS} parts of "
                                   f"{self.part_size} bytes: the disk is larger than its size hint",
                                   field="spec.storage")
        self.next_part += 1
        have = self.existing.get(number)
        if have and have[0] == len(data) and have[1] == hashlib.md5(data, usedforsecurity=False).hexdigest():
            self.done[number] = have[1]
            self.reused += len(data)
            return
        while len(self.pending) >= self.max_inflight:  # bounded memory: wait for the oldest part
            self.pending.popleft().result()
        self.pending.append(self.s.pool.submit(self._upload_part, number, data))

    def _upload_part(self, number: int, data: bytes) -> None:
        try:
            resp = self.s.client.upload_part(Bucket=self.s.bucket, Key=self.key, UploadId=self.upload_id,
                                             PartNumber=number, Body=data)
        except Exception as err:
            raise translate(err, f"uploading part {number} of s3://{self.s.bucket}/{self.key}") from err
        with self._lock:
            self.done[number] = resp["ETag"].strip('"')
            self.sent += len(data)

    def commit(self) -> None:
        client = self.s.client
        if self.upload_id is None and self.next_part == 1:
            # small object: one PUT
            body = b"".join(self.chunks)
            try:
                client.put_object(Bucket=self.s.bucket, Key=self.key, Body=body)
            except Exception as err:
                raise translate(err, f"writing s3://{self.s.bucket}/{self.key}") from err
            self.sent += len(body)
            self.chunks, self.buffered = [], 0
            return
        if self.chunks:
            self._submit(b"".join(self.chunks))
            self.chunks, self.buffered = [], 0
        while self.pending:
            self.pending.popleft().result()
        parts = [{"PartNumber": n, "ETag": f'"{self.done[n]}"'} for n in sorted(self.done)]
        try:
            client.complete_multipart_upload(Bucket=self.s.bucket, Key=self.key, UploadId=self.upload_id,
                                             MultipartUpload={"Parts": parts})
        except Exception as err:
            raise translate(err, f"completing s3://{self.s.bucket}/{self.key}") from err
        if self.reused:
            log.info("upload of %s resumed: %d bytes were already stored, %d sent", self.key, self.reused, self.sent)

    def abort(self) -> None:
        # Keep the stored parts: the retry resumes from them. deleteIntermediate removes leftovers.
        for fut in self.pending:
            fut.cancel()
        for fut in self.pending:
            if not fut.cancelled():
                try:
                    fut.result()
                except Exception:  # noqa: BLE001 - the first error is already on its way up
                    pass
        self.pending.clear()
        self.chunks, self.buffered = [], 0


class _GuardedClient:
    """Every call of the boto3 client runs under the address guard (checked again on connect)."""

    def __init__(self, client: Any, guard: Callable[[Callable[[], Any]], Any]) -> None:
        self._client = client
        self._guard = guard

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name == "get_paginator":
            return lambda operation: _GuardedPaginator(attr(operation), self._guard)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self._guard(lambda: attr(*args, **kwargs))


class _GuardedPaginator:
    """Pages are fetched lazily while iterating: each fetch runs under the guard too."""

    def __init__(self, paginator: Any, guard: Callable[[Callable[[], Any]], Any]) -> None:
        self._paginator = paginator
        self._guard = guard

    def paginate(self, **kwargs: Any) -> Iterator[Any]:
        pages = iter(self._paginator.paginate(**kwargs))
        done = object()
        while True:
            page = self._guard(lambda: next(pages, done))
            if page is done:
                return
            yield page


class S3Storage(StorageBackend):
    type = "s3"

    def __init__(self, client: Any, bucket: str, *, endpoint: str | None = None, concurrency: int = 4,
                 part_size: int | None = None, guard: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        self.client = _GuardedClient(client, guard) if guard is not None else client
        self.bucket = bucket
        self.endpoint = endpoint
        self.concurrency = max(1, concurrency)
        self.part_size = part_size
        self.pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="s3-part")

    def check(self) -> str:
        if self.endpoint:
            from include.netpolicy import AddressPolicy

            AddressPolicy.from_env().check_endpoint(self.endpoint, field="spec.storage.endpoint")
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as err:
            raise translate(err, f"reaching bucket {self.bucket} at {self.endpoint or 'AWS'}") from err
        return f"S3 bucket {self.bucket} at {self.endpoint or 'AWS'}"

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def open_writer(self, key: str, size_hint: int) -> ObjectWriter:
        return _MultipartWriter(self, key, self.part_size or part_size_for(size_hint))

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except Exception as err:
            raise translate(err, f"reading the size of s3://{self.bucket}/{key}") from err

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise translate(err, f"checking s3://{self.bucket}/{key}") from err
        except Exception as err:
            raise translate(err, f"checking s3://{self.bucket}/{key}") from err
        return True

    def read(self, key: str, *, range_size: int = 8 * MiB) -> Iterator[Segment]:
        """The object in order, fetched as parallel ranged GETs (at most ``concurrency`` ranges ahead)."""
        total = self.size(key)

        def fetch(start: int) -> bytes:
            end = min(start + range_size, total) - 1
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}")["Body"]
                data = body.read()
            except Exception as err:
                raise translate(err, f"reading s3://{self.bucket}/{key} at {start}") from err
            if len(data) != end - start + 1:
                raise StorageError(f"short read of s3://{self.bucket}/{key} at {start}: {len(data)} bytes")
            return data

        offsets = iter(range(0, total, range_size))
        window: deque[Future] = deque()
        for start in offsets:
            window.append(self.pool.submit(fetch, start))
            if len(window) >= self.concurrency:
                break
        try:
            while window:
                data = window.popleft().result()
                nxt = next(offsets, None)
                if nxt is not None:
                    window.append(self.pool.submit(fetch, nxt))
                yield Segment(length=len(data), data=data)
        finally:
            for fut in window:
                fut.cancel()

    def delete(self, key: str) -> bool:
        """The object, its manifest and any unfinished multipart upload of exactly this key."""
        existed = self.exists(key)
        try:
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": key},
                                                                               {"Key": key + MANIFEST_SUFFIX}]})
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=key):
                for up in page.get("Uploads", []):
                    if up["Key"] == key:  # never another key that merely starts the same way
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=up["UploadId"])
                        existed = True
        except Exception as err:
            raise translate(err, f"deleting s3://{self.bucket}/{key}") from err
        return existed

    def put_document(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="application/json")
        except Exception as err:
            raise translate(err, f"writing s3://{self.bucket}/{key}") from err

    def get_document(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise translate(err, f"reading s3://{self.bucket}/{key}") from err
        except Exception as err:
            raise translate(err, f"reading s3://{self.bucket}/{key}") from err

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def from_spec(storage, credentials=None) -> S3Storage:
    """The backend of a spec's ``storage`` block of type s3, with keys from its Secret."""
    from include.storage import address_guard

    settings = settings_from(storage, credentials)
    return S3Storage(boto3_client(settings), settings.bucket, endpoint=settings.endpoint_url, guard=address_guard())
