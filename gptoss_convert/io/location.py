"""Object-store locations (`gs://bucket/prefix`, `s3://bucket/prefix`) through TensorStore.

A `Location` names one object, or the "directory" of objects under a prefix, and behaves like
the few `pathlib.Path` methods the writers and readers use (`/`, `name`, `parent`,
`relative_to`, `is_file`, `read_bytes`, `write_text`...), so that code written for a local
checkpoint directory reads and writes a bucket unchanged. Every byte goes through TensorStore's
kvstore drivers (`gcs`, `s3`), the same ones the zarr3 arrays are opened with.

Credentials are found the standard way by TensorStore: application default credentials for GCS
(GOOGLE_APPLICATION_CREDENTIALS, gcloud's file, the metadata server); the AWS environment
variables, profile files and instance metadata for S3. TensorStore ignores AWS_ENDPOINT_URL*,
so an S3-compatible store's endpoint is given with --s3-endpoint or GPTOSS_CONVERT_S3_ENDPOINT
and passed in the kvstore spec (with AWS_REGION / AWS_DEFAULT_REGION, if set).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path, PurePosixPath

import tensorstore as ts

from gptoss_convert.errors import InputError, OutputError

SCHEMES = {"gs": "gcs", "s3": "s3"}           # URL scheme -> TensorStore kvstore driver
ENDPOINT_ENV = "GPTOSS_CONVERT_S3_ENDPOINT"
RETRIES_ENV = "GPTOSS_CONVERT_STORE_RETRIES"   # bounded retries: a dropped store fails, not hangs
DEFAULT_RETRIES = 8


def is_url(x) -> bool:
    """Whether `x` names an object-store location (a Location, or a gs:// or s3:// string)."""
    return isinstance(x, Location) or (isinstance(x, str) and x.split("://", 1)[0] in SCHEMES and "://" in x)


def store_context() -> dict:
    """TensorStore context entries for the object-store drivers: retries bounded so that an
    unreachable store ends in an error after about a minute, not after TensorStore's default."""
    n = int(os.environ.get(RETRIES_ENV, DEFAULT_RETRIES))
    retries = {"max_retries": n, "initial_delay": "0.5s", "max_delay": "16s"}
    return {"gcs_request_retries": retries, "s3_request_retries": retries}


@functools.lru_cache(maxsize=None)
def _root(scheme: str, bucket: str, endpoint: str | None, region: str | None) -> ts.KvStore:
    """One open kvstore per bucket (TensorStore shares its connections and credentials)."""
    return ts.KvStore.open(_spec(scheme, bucket, "", endpoint, region), context=ts.Context(store_context())).result()


def _spec(scheme: str, bucket: str, path: str, endpoint: str | None, region: str | None) -> dict:
    spec = {"driver": SCHEMES[scheme], "bucket": bucket, "path": path}
    if scheme == "s3":
        if endpoint:
            spec["endpoint"] = endpoint
        if region:
            spec["aws_region"] = region
    return spec


@dataclasses.dataclass(frozen=True)
class Location:
    """An object key (or key prefix) in a bucket; `str()` gives its URL."""

    scheme: str
    bucket: str
    key: str = ""                      # no leading or trailing "/"
    endpoint: str | None = None        # S3-compatible endpoint (s3 only)
    region: str | None = None

    @classmethod
    def parse(cls, url: str, *, s3_endpoint: str | None = None) -> "Location":
        """`gs://bucket/a/b` or `s3://bucket/a/b`; the S3 endpoint defaults to GPTOSS_CONVERT_S3_ENDPOINT."""
        m = re.fullmatch(r"(gs|s3)://([^/]+)/*(.*?)/*", str(url))
        if not m:
            raise InputError(f"{url}: not a gs://BUCKET/PREFIX or s3://BUCKET/PREFIX URL")
        scheme, bucket, key = m.groups()
        if any(part in ("", ".", "..") for part in key.split("/")) and key:
            raise InputError(f"{url}: empty, '.' or '..' path component; spell the prefix out")
        endpoint = region = None
        if scheme == "s3":
            endpoint = s3_endpoint or os.environ.get(ENDPOINT_ENV) or None
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
        return cls(scheme, bucket, key, endpoint, region)

    # --- the pathlib.Path subset ------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}".rstrip("/")

    def __truediv__(self, name) -> "Location":
        key = "/".join(p for p in (self.key, str(name).strip("/")) if p)
        return dataclasses.replace(self, key=key)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        return dataclasses.replace(self, key=self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    def relative_to(self, other: "Location") -> PurePosixPath:
        if other.key and not self.key.startswith(other.key + "/"):
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(self.key[len(other.key) + 1:] if other.key else self.key)

    def as_posix(self) -> str:
        return str(self)

    def absolute(self) -> "Location":
        return self

    def kvstore(self) -> dict:
        """TensorStore kvstore spec of this prefix as a directory (path ends in '/')."""
        return _spec(self.scheme, self.bucket, self.key + "/" if self.key else "", self.endpoint, self.region)

    @property
    def _store(self) -> ts.KvStore:
        return _root(self.scheme, self.bucket, self.endpoint, self.region)

    # --- objects ----------------------------------------------------------------------------
    def read_bytes(self, byte_range: slice | None = None) -> bytes:
        """The object's bytes (`byte_range`: those of slice(start, stop) only, fewer at its end);
        FileNotFoundError if there is none."""
        r = self._call(lambda: self._read(byte_range), writing=False)
        if r.state != "value":
            raise FileNotFoundError(str(self))
        return bytes(r.value)

    def _read(self, byte_range: slice | None):
        try:
            return self._store.read(self.key, byte_range=byte_range).result()
        except ValueError as e:
            # TensorStore refuses a range the object does not fill: what is left is shorter than asked
            if byte_range is None or byte_range.stop is None or not str(e).startswith("OUT_OF_RANGE"):
                raise
            try:
                return self._store.read(self.key, byte_range=slice(byte_range.start, None)).result()
            except ValueError as end:
                if not str(end).startswith("OUT_OF_RANGE"):
                    raise
                return ts.KvStore.ReadResult("value", b"")      # starts at (or past) the end

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data) -> None:
        """Create or replace the object (object stores make each write atomic)."""
        self._call(lambda: self._store.write(self.key, bytes(data)).result(), writing=True)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def is_file(self) -> bool:
        """Whether an object with exactly this key exists."""
        return bool(self.key) and self._call(lambda: self._store.read(self.key).result(),
                                             writing=False).state == "value"

    def keys(self) -> list[str]:
        """Keys of every object under this prefix, relative to it, sorted."""
        prefix = self.key + "/" if self.key else ""
        rng = ts.KvStore.KeyRange(prefix, _successor(prefix)) if prefix else ts.KvStore.KeyRange()
        listed = self._call(lambda: self._store.list(rng).result(), writing=False)
        return sorted(k.decode()[len(prefix):] for k in listed)

    def is_dir(self) -> bool:
        return bool(self.keys())

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def unlink(self, missing_ok: bool = False) -> None:
        """Delete the object (a missing one is no error: object stores do not tell)."""
        self._call(lambda: self._store.delete_range(ts.KvStore.KeyRange(self.key, self.key + "\0")).result(),
                   writing=True)

    def delete_tree(self) -> None:
        """Delete every object under this prefix."""
        prefix = self.key + "/" if self.key else ""
        rng = ts.KvStore.KeyRange(prefix, _successor(prefix)) if prefix else ts.KvStore.KeyRange()
        self._call(lambda: self._store.delete_range(rng).result(), writing=True)

    def _call(self, fn, *, writing: bool):
        """Run a TensorStore operation; its errors become one line naming this URL."""
        try:
            return fn()
        except ValueError as e:
            err = OutputError if writing else InputError
            raise err(f"{self}: {describe_store_error(e, self.bucket)}") from None


def _successor(prefix: str) -> str:
    """The smallest key after every key that starts with `prefix` (which ends in '/')."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def describe_store_error(e: BaseException, bucket: str) -> str:
    """What went wrong with an object-store request, and what to do, in one line."""
    text = str(e)
    if "NoSuchBucket" in text or ("NOT_FOUND" in text and "404" in text):
        return f"bucket {bucket!r} does not exist (or is not visible with these credentials); create it or fix the URL"
    if re.search(r"PERMISSION_DENIED|UNAUTHENTICATED|http_response_code='?40[13]|AccessDenied|credentials", text):
        return ("access denied: check the credentials (GCS: GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth "
                "application-default login`; S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    if re.search(r"UNAVAILABLE|DEADLINE_EXCEEDED|Couldn't connect|Connection|connect|timed? ?out|CURL", text, re.I):
        return ("cannot reach the store (connection refused, dropped or timed out); check the network or "
                f"the endpoint, then rerun (with --resume to continue a conversion) [{' '.join(text.split())[:160]}]")
    return " ".join(text.split())[:300]


def resolve(x, *, s3_endpoint: str | None = None):
    """A Location for gs:// and s3:// strings (Locations pass through), else a pathlib.Path."""
    if isinstance(x, Location):
        return x
    return Location.parse(x, s3_endpoint=s3_endpoint) if is_url(x) else Path(x)
