"""The S3 backend: a repository under ``s3://BUCKET/PREFIX`` on any S3-compatible store, through boto3.

Object ``NAME`` is the key ``PREFIX/NAME`` (``NAME`` when there is no prefix).  Tested against Ceph's
RADOS Gateway (``tools/ceph-one-node``); written for AWS S3 and MinIO too.

Where and who:

* endpoint: the ``endpoint_url`` argument (``--endpoint-url``), else ``$COWBACKUP_S3_ENDPOINT``, else
  ``$AWS_ENDPOINT_URL``, else AWS itself.  Path-style addressing (``https://host/bucket/key``) whenever
  an endpoint is given (what on-premises stores serve), AWS's choice otherwise;
  ``$COWBACKUP_S3_ADDRESSING`` (``path``, ``virtual``, ``auto``) overrides it.
* region: the argument, else the AWS configuration (``$AWS_REGION``, ``$AWS_DEFAULT_REGION``, the
  profile), else ``us-east-1``.
* credentials: boto3's usual chain (environment, ``~/.aws/credentials`` and ``~/.aws/config`` with
  ``$AWS_PROFILE``, container and instance roles).  They are never printed or logged: messages name
  the bucket, the endpoint (without any user:password part) and where the credentials came from.
* TLS: a custom CA bundle from ``$AWS_CA_BUNDLE`` or the profile's ``ca_bundle`` (boto3 reads both).

The bucket must exist: ``repo init`` creates objects only.  Creating a bucket is the storage owner's
decision (region, policy, versioning, lifecycle rules), and a typo in a bucket name should fail, not
create a second bucket.  Opening a store sends one HEAD for the bucket so that a wrong endpoint, wrong
credentials or a missing bucket fail at once with a usage error (exit 2).

Requests: one client (thread-safe) whose connection pool holds ``max_connections``; a semaphore keeps
the requests in flight to that many, so that extra threads wait instead of opening connections the pool
would throw away.  botocore retries each request (``standard`` mode: 5xx, SlowDown and other throttling,
timeouts, connection resets; exponential backoff with jitter).  On top of that this module retries, with
its own backoff and full jitter within :data:`RETRY_BUDGET` seconds, what botocore does not: a body that
breaks off or disagrees with its Content-Length while it is read, and an endpoint that stays unreachable
for longer than botocore's few attempts (a gateway restarting); ``$COWBACKUP_S3_RETRY_BUDGET`` (seconds)
overrides the budget.  Each socket operation has a timeout
(``timeout``: connect and read); botocore has no limit on a whole request, so a request that makes
progress, however slowly, is not cut off.  Every HTTP request is counted in :attr:`S3Store.requests` as
it leaves (each listing page, each part of an upload, each attempt of a retried request), and each
repeated attempt also in its ``retries``; this module logs a warning for each retry of its own.

Conditional writes: ``put_if_absent`` is a PutObject with ``If-None-Match: *``; the store answers 412 to
the loser of a race (Ceph RGW since 16, AWS S3 since 2024, MinIO).  A store that ignores the header lets
the last writer win: the repository stays safe where every name written with ``put_if_absent`` is
unique or content-addressed (chunks, segments, manifests with random ids), but two gc runs could take
the same record number and two ``repo init`` could overwrite each other's config -- run a single gc per
repository on such a store.  When a conditional PUT was retried (the first attempt may have succeeded
with its answer lost) and then meets a 412, the object's ETag is compared with the MD5 of our bytes: if
they match, the object is ours and the call returns True.

Objects above ``multipart_threshold`` (64 MiB; chunks are 4 MiB, only a huge index segment or gc record
gets there) are uploaded in parts.  Ceph ignores ``If-None-Match`` on CompleteMultipartUpload (it
silently overwrites), so ``put_if_absent`` of such an object is emulated: a HEAD first (present: False),
then the upload, completed with ``If-None-Match: *`` for the stores that honour it.  Two writers racing
on one large name may then both see True, the later one's bytes winning; large objects are segments
named by their content, where that is harmless.

Store times: S3 gives Last-Modified in whole seconds in a HEAD (an HTTP date) and in milliseconds in a
listing.  Both are floored to whole seconds here, so that one object has one time whichever way it was
read; gc's comparisons of store times hold with a 1-second clock (``gc.py``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import boto3
import botocore.exceptions
from botocore.config import Config

from cowbackup.repo.errors import MissingObject, RepoError, RepoUsageError, StoreError
from cowbackup.repo.store import DELETE_BATCH, ObjectInfo, RequestCounts, Store, check_name, check_size

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
#: Objects larger than this are uploaded in parts.
MULTIPART_THRESHOLD = 64 * MiB
#: The size of each part but the last (S3's minimum is 5 MiB).
PART_SIZE = 16 * MiB
#: Requests in flight at once (and connections kept).
MAX_CONNECTIONS = 32
#: Seconds a connect or a socket read may take.
TIMEOUT = 60.0
#: Attempts botocore makes for each request.
BOTOCORE_ATTEMPTS = 5
#: Seconds this module keeps retrying what botocore gave up on (or does not cover), once the endpoint
#: has answered at least once.
RETRY_BUDGET = 120.0

_RETRY_BASE = 0.2
_RETRY_CAP = 10.0
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken"}
_NO_BUCKET = {"NoSuchBucket"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412"}
#: Answers that are worth another try once botocore's own attempts ran out.
_TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
    "ServiceUnavailable",
    "InternalError",
    "ConditionalRequestConflict",  # AWS: another conditional write to the key is in progress
    "500",
    "502",
    "503",
    "504",
}


#: What each S3 operation is billed as (``RequestCounts``' kinds).
_KIND_OF = {
    "PutObject": "put",
    "CreateMultipartUpload": "put",
    "UploadPart": "put",
    "CompleteMultipartUpload": "put",
    "GetObject": "get",
    "HeadObject": "stat",
    "HeadBucket": "stat",
    "ListObjectsV2": "list",
    "DeleteObjects": "delete",
    "AbortMultipartUpload": "delete",
}


class _Retry(Exception):
    """A failure worth another attempt (what went wrong, for the final message)."""


def parse_location(location: str) -> tuple[str, str]:
    """``s3://BUCKET[/PREFIX]`` -> (bucket, prefix without slashes at either end)."""
    if not location.startswith("s3://"):
        raise RepoUsageError(f"'{location}' is not an s3://BUCKET/PREFIX location")
    bucket, _, prefix = location[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    if not 3 <= len(bucket) <= 63 or not all(c.isalnum() or c in ".-_" for c in bucket):
        raise RepoUsageError(f"'{location}': '{bucket}' is not a valid bucket name (3 to 63 characters)")
    if prefix:
        check_name(prefix)
    return bucket, prefix


def _safe_url(url: str) -> str:
    """``url`` without a user:password part (messages must never show credentials)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _code(err: botocore.exceptions.ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _status(err: botocore.exceptions.ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _retried(err: botocore.exceptions.ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("RetryAttempts", 0))


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes | bytearray:
    # botocore wants bytes-like objects with len() and seek semantics it can wrap; memoryview lacks them.
    return data.tobytes() if isinstance(data, memoryview) else data


def _store_time(when: Any) -> float:
    return float(int(when.timestamp()))


class S3Store(Store):
    """A repository under ``s3://BUCKET/PREFIX`` (see the module docstring for every option)."""

    def __init__(
        self,
        location: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float = TIMEOUT,
        retry_budget: float | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
    ) -> None:
        self.bucket, self.prefix = parse_location(location)
        endpoint = (
            endpoint_url or os.environ.get("COWBACKUP_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        )
        self.endpoint = endpoint or None
        self.location = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._where = f"bucket '{self.bucket}' at {_safe_url(self.endpoint) if self.endpoint else 'AWS S3'}"
        self.retry_budget = (
            retry_budget if retry_budget is not None else _env_seconds("COWBACKUP_S3_RETRY_BUDGET")
        )
        self.multipart_threshold = max(multipart_threshold, 5 * MiB)
        self.part_size = max(part_size, 5 * MiB)
        self.requests = RequestCounts()
        self._reached = False
        self._slots = threading.BoundedSemaphore(max_connections)
        addressing = os.environ.get("COWBACKUP_S3_ADDRESSING") or ("path" if self.endpoint else "auto")
        if addressing not in ("path", "virtual", "auto"):
            raise RepoUsageError(f"COWBACKUP_S3_ADDRESSING must be path, virtual or auto, not '{addressing}'")
        try:
            session = boto3.session.Session(profile_name=profile)
            self._credentials_from = self._credential_source(session)
            self._client = session.client(
                "s3",
                endpoint_url=self.endpoint,
                region_name=region or session.region_name or "us-east-1",
                config=Config(
                    s3={"addressing_style": addressing},
                    max_pool_connections=max_connections,
                    connect_timeout=min(timeout, 10.0),
                    read_timeout=timeout,
                    retries={"mode": "standard", "max_attempts": BOTOCORE_ATTEMPTS},
                    # The repository checks every object's SHA-256 itself; CRC trailers on every request
                    # cost CPU and are not understood by every S3-compatible store.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
        except botocore.exceptions.ProfileNotFound as err:
            raise RepoUsageError(f"{self.location}: {err}") from None
        except ValueError as err:  # an endpoint URL botocore cannot parse
            raise RepoUsageError(f"{self.location}: invalid S3 endpoint: {err}") from None
        # Counted as each HTTP request leaves (botocore's retries included), not per call of ours: a
        # listing is several pages, a multipart upload several requests.
        self._client.meta.events.register("before-send.s3", self._count_request)
        self._check_bucket()

    @property
    def retries(self) -> int:
        """Attempts that repeated a failed one, botocore's and ours."""
        return self.requests.snapshot()["retries"]

    def _count_request(self, request: Any, event_name: str, **_: Any) -> None:
        operation = event_name.rpartition(".")[2]
        self.requests.add(_KIND_OF.get(operation, "get"))
        # botocore's standard retry mode numbers its attempts (1 for the first) in the request context.
        retrying = getattr(request, "context", {}).get("retries") or {}
        if int(retrying.get("attempt", 1)) > 1:
            self.requests.add("retries")

    @staticmethod
    def _credential_source(session: Any) -> str:
        creds = session.get_credentials()
        if creds is None:
            return ""
        return str(getattr(creds, "method", "") or "")

    def _check_bucket(self) -> None:
        if not self._credentials_from:
            raise RepoUsageError(
                f"no S3 credentials for {self._where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE with a profile in ~/.aws/credentials"
            )
        try:
            with self._slots:
                self._client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as err:
            code, status = _code(err), _status(err)
            if status == 404 or code in _NO_BUCKET:
                raise RepoUsageError(
                    f"{self._where} does not exist; create it first (repo init creates objects only)"
                ) from None
            raise self._error(err, "open the repository", self.prefix or "/") from None
        except (botocore.exceptions.BotoCoreError, OSError) as err:
            raise self._connection_error(err) from None
        self._reached = True

    # -- errors and retries --------------------------------------------------------------------------

    def _connection_error(self, err: Exception) -> RepoError:
        if isinstance(err, botocore.exceptions.NoCredentialsError):
            return RepoUsageError(f"no S3 credentials for {self._where}")
        if isinstance(err, botocore.exceptions.SSLError):
            return RepoUsageError(
                f"TLS failure talking to {self._where} (a private CA? set AWS_CA_BUNDLE): {err}"
            )
        if not self._reached and isinstance(
            err, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)
        ):
            return RepoUsageError(
                f"cannot connect to the S3 endpoint for {self._where}: check --endpoint-url"
            )
        return StoreError(f"S3 request to {self._where} failed: {err}")

    def _error(self, err: botocore.exceptions.ClientError, what: str, name: str) -> RepoError:
        code, status = _code(err), _status(err)
        if code in _NO_BUCKET:
            return RepoUsageError(f"{self._where} does not exist (any more)")
        if code in _DENIED or status == 403:
            via = f" (credentials from {self._credentials_from})" if self._credentials_from else ""
            return RepoUsageError(
                f"access denied to {self._where}{via}: wrong access key or secret, or no permission "
                f"to {what} '{name}' ({code or status})"
            )
        return StoreError(f"cannot {what} '{name}' in {self._where}: {code or status} {err}")

    def _call(self, what: str, name: str, attempt: Callable[[], T]) -> T:
        """``attempt()`` under a connection slot, repeated with backoff and full jitter while it fails in
        a way worth retrying and the retry budget lasts; the repository's error otherwise.

        ``attempt`` raises ClientError for answers it does not handle itself, and _Retry for a broken body.
        """
        began = time.monotonic()
        tries = 0
        while True:
            try:
                with self._slots:
                    result = attempt()
                self._reached = True
                return result
            except botocore.exceptions.ClientError as err:
                code, status = _code(err), _status(err)
                if code not in _TRANSIENT and not (500 <= status < 600):
                    raise self._error(err, what, name) from None
                problem = f"{code or status}"
            except _Retry as err:
                problem = str(err)
            except (
                botocore.exceptions.EndpointConnectionError,
                botocore.exceptions.ConnectionClosedError,
                botocore.exceptions.ReadTimeoutError,
                botocore.exceptions.ConnectTimeoutError,
                botocore.exceptions.ResponseStreamingError,
                botocore.exceptions.IncompleteReadError,
                ConnectionError,
            ) as err:
                if not self._reached:
                    raise self._connection_error(err) from None
                problem = str(err)
            except (botocore.exceptions.BotoCoreError, OSError) as err:
                raise self._connection_error(err) from None
            tries += 1
            delay = random.uniform(0, min(_RETRY_CAP, _RETRY_BASE * 2**tries))
            if time.monotonic() - began + delay > self.retry_budget:
                raise StoreError(
                    f"cannot {what} '{name}' in {self._where}: {problem} "
                    f"(gave up after {tries} tries in {time.monotonic() - began:.0f} s)"
                )
            self.requests.add("retries")
            log.warning("S3: %s '%s' failed (%s); retrying in %.1f s", what, name, problem, delay)
            time.sleep(delay)

    # -- names ---------------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _name(self, key: str) -> str | None:
        """The object name of a listed key, or None for a key that is not a valid object name."""
        name = key[len(self.prefix) + 1 :] if self.prefix else key
        try:
            return check_name(name)
        except RepoUsageError:
            return None

    # -- reading -------------------------------------------------------------------------------------

    def _read_body(self, reply: dict[str, Any], name: str, expected: int | None = None) -> bytes:
        body = reply["Body"]
        try:
            data = body.read()
        except (
            botocore.exceptions.IncompleteReadError,
            botocore.exceptions.ResponseStreamingError,
            botocore.exceptions.ReadTimeoutError,
        ) as err:
            raise _Retry(f"the body of '{name}' broke off: {err}") from None
        finally:
            body.close()
        length = reply.get("ContentLength")
        if length is not None and len(data) != length:
            raise _Retry(f"'{name}': {len(data)} bytes received, Content-Length said {length}")
        if expected is not None and len(data) != expected:
            raise _Retry(f"'{name}': {len(data)} bytes received where {expected} were asked for")
        return bytes(data)

    def get(self, name: str, *, limit: int | None = None) -> bytes:
        key = self._key(name)

        def attempt() -> bytes:
            try:
                reply = self._client.get_object(Bucket=self.bucket, Key=key)
            except botocore.exceptions.ClientError as err:
                if _code(err) in _MISSING:
                    raise MissingObject(name) from None
                raise
            length = reply.get("ContentLength")
            if limit is not None and length is not None and length > limit:
                reply["Body"].close()  # before reading a byte of it
                check_size(name, length, limit)
            data = self._read_body(reply, name)
            check_size(name, len(data), limit)  # a reply without Content-Length
            return data

        return self._call("read", name, attempt)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        if length <= 0:
            if self.stat(name) is None:
                raise MissingObject(name)
            return b""
        key = self._key(name)

        def attempt() -> bytes:
            try:
                reply = self._client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}"
                )
            except botocore.exceptions.ClientError as err:
                if _code(err) in _MISSING:
                    raise MissingObject(name) from None
                if _code(err) == "InvalidRange" or _status(err) == 416:
                    return b""  # the range starts at or past the end
                raise
            total = _range_total(reply.get("ContentRange"))
            expected = None if total is None else max(0, min(length, total - offset))
            return self._read_body(reply, name, expected)

        return self._call("read", name, attempt)

    def _head(self, key: str) -> dict[str, Any] | None:
        """One HEAD request: the object's headers, None if it does not exist (ClientError otherwise)."""
        try:
            reply: dict[str, Any] = self._client.head_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as err:
            if _code(err) in _MISSING:
                return None
            raise
        return reply

    def stat(self, name: str) -> ObjectInfo | None:
        key = self._key(name)

        def attempt() -> ObjectInfo | None:
            reply = self._head(key)
            if reply is None:
                return None
            return ObjectInfo(name, int(reply["ContentLength"]), _store_time(reply["LastModified"]))

        return self._call("stat", name, attempt)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        if prefix:
            check_name(prefix.rstrip("/"))
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        token: str | None = None
        while True:
            page = self._list_page(full, token, prefix)
            for item in page.get("Contents", ()):
                name = self._name(item["Key"])
                if name is None:
                    log.debug("S3: skipping key %r (not an object name)", item["Key"])
                    continue
                yield ObjectInfo(name, int(item["Size"]), _store_time(item["LastModified"]))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def _list_page(self, full_prefix: str, token: str | None, prefix: str) -> dict[str, Any]:
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix, "MaxKeys": 1000}
        if token:
            params["ContinuationToken"] = token
        page: dict[str, Any] = self._call(
            "list", prefix or "/", lambda: self._client.list_objects_v2(**params)
        )
        return page

    # -- writing -------------------------------------------------------------------------------------

    def put(self, name: str, data: bytes | bytearray | memoryview, *, durable: bool = True) -> None:
        # S3 acknowledges a PUT once the object is stored: every write is durable.
        key = self._key(name)
        body = _as_bytes(data)
        if len(body) > self.multipart_threshold:
            self._multipart(name, key, body, conditional=False)
            return
        self._call("write", name, lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=body))

    def put_if_absent(self, name: str, data: bytes | bytearray | memoryview, *, durable: bool = True) -> bool:
        key = self._key(name)
        body = _as_bytes(data)
        if len(body) > self.multipart_threshold:
            if self.stat(name) is not None:
                return False
            return self._multipart(name, key, body, conditional=True)
        tried = 0

        def attempt() -> bool:
            nonlocal tried
            tried += 1
            try:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
            except botocore.exceptions.ClientError as err:
                if _code(err) not in _PRECONDITION and _status(err) != 412:
                    raise
                if tried == 1 and _retried(err) == 0:
                    return False
                # An earlier attempt may have stored the object and lost its answer: is it ours?
                return self._holds(key, body)
            return True

        return self._call("write", name, attempt)

    def _holds(self, key: str, body: bytes | bytearray) -> bool:
        """Whether the object at ``key`` holds exactly ``body`` (by its single-part ETag, an MD5)."""
        reply = self._head(key)
        if reply is None or int(reply["ContentLength"]) != len(body):
            return False
        return str(reply.get("ETag", "")).strip('"') == hashlib.md5(body, usedforsecurity=False).hexdigest()

    def _multipart(self, name: str, key: str, body: bytes | bytearray, *, conditional: bool) -> bool:
        upload = self._call(
            "start an upload of",
            name,
            lambda: self._client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"],
        )
        view = memoryview(body)
        parts = []
        try:
            for number, start in enumerate(range(0, len(body), self.part_size), 1):
                piece = view[start : start + self.part_size].tobytes()
                md5 = base64.b64encode(hashlib.md5(piece, usedforsecurity=False).digest()).decode()

                def send(piece: bytes = piece, number: int = number, md5: str = md5) -> str:
                    reply = self._client.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload,
                        PartNumber=number,
                        Body=piece,
                        ContentMD5=md5,
                    )
                    return str(reply["ETag"])

                parts.append({"PartNumber": number, "ETag": self._call("write", name, send)})
            extra = {"IfNoneMatch": "*"} if conditional else {}

            def complete() -> bool:
                try:
                    self._client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload,
                        MultipartUpload={"Parts": parts},
                        **extra,
                    )
                except botocore.exceptions.ClientError as err:
                    if conditional and (_code(err) in _PRECONDITION or _status(err) == 412):
                        return False
                    raise
                return True

            created = self._call("write", name, complete)
        except BaseException:
            with contextlib.suppress(RepoError, botocore.exceptions.BotoCoreError):
                self._call(
                    "abort the upload of",
                    name,
                    lambda: self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload),
                )
            raise
        if not created:
            # The store refused to complete over an existing object: the parts are ours to drop.
            with contextlib.suppress(RepoError, botocore.exceptions.BotoCoreError):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
        return created

    def delete(self, names: Iterable[str]) -> None:
        keys = [self._key(n) for n in names]
        for i in range(0, len(keys), DELETE_BATCH):
            batch = keys[i : i + DELETE_BATCH]
            request = {"Objects": [{"Key": k} for k in batch], "Quiet": True}

            def send(request: dict[str, Any] = request) -> dict[str, Any]:
                reply: dict[str, Any] = self._client.delete_objects(Bucket=self.bucket, Delete=request)
                return reply

            reply = self._call("delete", self._name(batch[0]) or batch[0], send)
            failed = [e for e in reply.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if failed:
                shown = ", ".join(
                    f"'{self._name(e['Key']) or e['Key']}' ({e.get('Code')})" for e in failed[:5]
                )
                more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
                raise StoreError(f"cannot delete {len(failed)} object(s) in {self._where}: {shown}{more}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()


def _env_seconds(name: str) -> float:
    text = os.environ.get(name)
    if not text:
        return RETRY_BUDGET
    try:
        value = float(text)
    except ValueError:
        raise RepoUsageError(f"{name} must be a number of seconds, not '{text}'") from None
    if not value >= 0:
        raise RepoUsageError(f"{name} must not be negative")
    return value


def _range_total(content_range: str | None) -> int | None:
    """The object's size from a ``Content-Range: bytes A-B/TOTAL`` header."""
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rpartition("/")[2]
    return int(total) if total.isdigit() else None
