"""Storage URIs: parse and validate local paths and ``s3://bucket/prefix`` URIs, build fsspec storage options,
join names safely, and redact credentials from anything that may reach a log, an error or a stored attribute.

Everything here is pure (no I/O): the stores open the filesystems themselves.

- :func:`parse_uri` -> :class:`StorageLocation` (``scheme`` ``"s3"`` or ``"file"``, ``bucket``, ``path``).
- :func:`build_storage_options` -> the s3fs options from explicit arguments, else the standard AWS environment
  variables, with bounded connect timeouts and retries so that a dead endpoint fails in seconds.
- :func:`resolve_storage_options` -> the options a given URI needs (``None`` for local paths).
- :func:`redact` -> a copy of a string / mapping / sequence with credentials replaced by ``"***"``.
- :func:`safe_join` -> ``root/name`` for a relative ``name`` that cannot escape ``root``.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from phpn_core.errors import InputValueError

__all__ = [
    "secrets_of",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_READ_TIMEOUT",
    "REDACTED",
    "StorageLocation",
    "build_storage_options",
    "is_remote",
    "parse_uri",
    "redact",
    "resolve_storage_options",
    "safe_join",
]

REDACTED = "***"

# A dead endpoint must fail in seconds, not minutes: botocore's defaults (60 s connect timeout, legacy retries)
# multiplied by s3fs's own retry loop take minutes. These bound one request to roughly
# max_attempts * connect_timeout plus a small backoff.
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_MAX_ATTEMPTS = 3
# s3fs >= 2025 sends a HEAD before every whole-object GET to decide whether to download it in concurrent parts
# (only for objects > its 50 MiB block size). Zarr chunks are a few MiB: max_concurrency=1 drops that HEAD and
# halves the requests per chunk read. Zarr's own concurrency across chunks is unaffected.
_S3FS_DEFAULTS: dict[str, Any] = {"max_concurrency": 1}

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.DOTALL)
# S3 bucket naming rules (the subset that matters for catching typos): 3-63 chars of lowercase letters,
# digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@dataclass(frozen=True)
class StorageLocation:
    """A validated storage location.

    ``scheme`` is ``"s3"`` (then ``bucket`` is set and ``path`` is the key prefix inside it, without leading or
    trailing slashes, possibly empty) or ``"file"`` (then ``bucket`` is None and ``path`` is an absolute local path).
    """

    scheme: Literal["s3", "file"]
    bucket: str | None
    path: str

    @property
    def is_remote(self) -> bool:
        return self.scheme != "file"

    @property
    def url(self) -> str:
        """The canonical form: ``s3://bucket/prefix`` or an absolute local path (what fsspec and zarr take)."""
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"
        return self.path

    def __str__(self) -> str:
        return self.url


def parse_uri(uri: str | os.PathLike[str]) -> StorageLocation:
    """Parse and validate a storage URI: a local path, ``file:///abs/path`` or ``s3://bucket[/prefix]``.

    Raises :class:`InputValueError` for an empty URI, an unsupported scheme, an ``s3://`` URI without a bucket or
    with an invalid bucket name, or credentials embedded in the URI (they would end up in logs).
    """
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str):
        raise InputValueError(
            f"Storage URI has the wrong type: expected a str or path-like (a local path or 's3://bucket/prefix'), "
            f"got {type(uri).__name__}. Fix: pass the location as a string."
        )
    text = uri.strip()
    if not text:
        raise InputValueError(
            "Storage URI is empty: expected a local path or 's3://bucket/prefix', got ''. "
            "Fix: pass where the store lives."
        )
    if "\x00" in text:
        raise InputValueError(
            f"Storage URI contains a NUL character: expected a printable path, got {redact(text)!r}. "
            "Fix: remove the NUL character."
        )
    m = _SCHEME_RE.match(text)
    if m is None:
        # A plain local path (relative paths are made absolute so that the store's identity is stable).
        return StorageLocation(scheme="file", bucket=None, path=os.path.abspath(os.path.expanduser(text)))
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "file":
        if not rest.startswith("/"):
            raise InputValueError(
                f"file:// URI is not absolute: expected 'file:///absolute/path', got {redact(text)!r}. "
                "Fix: use three slashes and an absolute path, or pass a plain local path."
            )
        return StorageLocation(scheme="file", bucket=None, path=os.path.abspath(rest))
    if scheme not in ("s3", "s3a"):
        raise InputValueError(
            f"Unsupported storage scheme {scheme!r}: expected a local path, 'file:///path' or 's3://bucket/prefix', "
            f"got {redact(text)!r}. Fix: copy the data to S3 (or an S3-compatible endpoint) or a local path."
        )
    authority, _, prefix = rest.partition("/")
    # user:secret@bucket; a secret may contain '/', so the '@' can sit past the first '/' (bucket names never
    # contain ':' or '@').
    if "@" in authority or (":" in authority and "@" in rest):
        raise InputValueError(
            f"S3 URI embeds credentials: expected 's3://bucket/prefix', got {redact(text)!r}. Fix: remove "
            "'user:secret@' from the URI and pass credentials through storage_options or AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY."
        )
    if not authority:
        raise InputValueError(
            f"S3 URI has no bucket: expected 's3://bucket/prefix', got {redact(text)!r}. "
            "Fix: put the bucket name right after 's3://'."
        )
    if not _BUCKET_RE.match(authority) or ".." in authority:
        raise InputValueError(
            f"S3 bucket name {redact(authority)!r} is invalid: expected 3-63 lowercase letters, digits, '.' or '-', "
            f"starting and ending with a letter or digit, got {redact(text)!r}. Fix: correct the bucket name."
        )
    parts = [p for p in prefix.split("/") if p]
    for p in parts:
        if p in (".", ".."):
            raise InputValueError(
                f"S3 URI has a '{p}' path component: expected plain key names, got {redact(text)!r}. "
                "Fix: write the key prefix without '.' or '..'."
            )
    return StorageLocation(scheme="s3", bucket=authority, path="/".join(parts))


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` URIs, False for local paths (validates the URI)."""
    return parse_uri(uri).is_remote


def build_storage_options(
    *,
    endpoint_url: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    token: str | None = None,
    region: str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """s3fs ``storage_options`` from explicit arguments, falling back to the environment.

    Environment (read now, never at import): ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``. Values that are
    neither given nor set are left out, so boto's own credential chain (profiles, instance roles) still applies.
    ``env`` replaces ``os.environ`` (for tests). The result always carries bounded timeouts and retries in
    ``config_kwargs`` (see :data:`DEFAULT_CONNECT_TIMEOUT`) and ``max_concurrency=1`` (one GET per Zarr chunk, no
    HEAD first; chunks are small). Never log the result without :func:`redact`.
    """
    env = os.environ if env is None else env
    endpoint_url = endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    key = key or env.get("AWS_ACCESS_KEY_ID") or None
    secret = secret or env.get("AWS_SECRET_ACCESS_KEY") or None
    token = token or env.get("AWS_SESSION_TOKEN") or None
    region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    if (key is None) != (secret is None):
        given, missing = ("key", "secret") if key is not None else ("secret", "key")
        raise InputValueError(
            f"Incomplete S3 credentials: expected both an access key id and a secret access key, got a {given} but "
            f"no {missing}. Fix: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or pass key= and secret=), "
            "or neither to use boto's default credential chain."
        )
    if endpoint_url is not None:
        _check_endpoint(endpoint_url)
    _check_positive("connect_timeout", connect_timeout)
    _check_positive("read_timeout", read_timeout)
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise InputValueError(
            f"max_attempts must be an int >= 1 (total tries per request), got {max_attempts!r}. Fix: pass e.g. 3."
        )
    opts: dict[str, Any] = dict(_S3FS_DEFAULTS)
    if endpoint_url is not None:
        opts["endpoint_url"] = endpoint_url
    if key is not None:
        opts["key"] = key
        opts["secret"] = secret
    if token is not None:
        opts["token"] = token
    if region is not None:
        opts["client_kwargs"] = {"region_name": region}
    opts["config_kwargs"] = {
        "connect_timeout": float(connect_timeout),
        "read_timeout": float(read_timeout),
        "retries": {"max_attempts": int(max_attempts), "mode": "standard"},
    }
    return opts


def resolve_storage_options(
    uri: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The fsspec options to open ``uri`` with.

    Local paths -> None (local files take no options; any given are ignored, so one option set can be passed for
    every URI of a run). ``s3://`` -> a deep copy of ``storage_options`` with the bounded timeouts/retries of
    :func:`build_storage_options` (and ``max_concurrency=1``) filled in where not set, or, when
    ``storage_options`` is None, :func:`build_storage_options` from the environment. The caller's mapping is
    never mutated.
    """
    loc = parse_uri(uri)
    if not loc.is_remote:
        return None
    if storage_options is None:
        return build_storage_options()
    if not isinstance(storage_options, Mapping):
        raise InputValueError(
            f"storage_options must be a mapping of s3fs options, got {type(storage_options).__name__}. "
            "Fix: pass a dict such as {'endpoint_url': ..., 'key': ..., 'secret': ...} or None to use the environment."
        )
    opts = {**_S3FS_DEFAULTS, **copy.deepcopy(dict(storage_options))}
    if "endpoint_url" in opts and opts["endpoint_url"] is not None:
        _check_endpoint(opts["endpoint_url"])
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
    config.setdefault("read_timeout", DEFAULT_READ_TIMEOUT)
    config.setdefault("retries", {"max_attempts": DEFAULT_MAX_ATTEMPTS, "mode": "standard"})
    opts["config_kwargs"] = config
    return opts


def safe_join(root: str | os.PathLike[str], name: str) -> str:
    """``root/name`` for a relative ``name`` made of plain components (``"a"``, ``"a/b"``).

    ``root`` is a local path or an ``s3://`` URI (validated by :func:`parse_uri`). Refuses (InputValueError)
    empty names, absolute paths, ``~``, drive letters, URIs, backslashes, control characters and ``.`` / ``..`` /
    empty components: a name built from data (a class name, a run id) can never escape ``root``.
    """
    loc = parse_uri(root)
    if not isinstance(name, str):
        raise InputValueError(
            f"Name to join has the wrong type: expected a str, got {type(name).__name__}. Fix: pass a string."
        )

    def refuse(why: str) -> InputValueError:
        return InputValueError(
            f"Unsafe name {redact(name)!r} to join under {redact(loc.url)!r}: {why}. Expected a relative name of "
            "plain components such as 'prototypes' or 'class_003/maps'. Fix: pass a relative name without "
            "'..', '.', leading '/', '~', '\\' or a scheme."
        )

    if not name:
        raise refuse("it is empty")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise refuse("it contains control characters")
    if "\\" in name:
        raise refuse("it contains a backslash")
    if name.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", name):
        raise refuse("it starts like an absolute path ('/', '~' or a drive letter)")
    if _SCHEME_RE.match(name):
        raise refuse("it is a URI")
    parts = name.split("/")
    if parts and parts[-1] == "":
        parts = parts[:-1]  # one trailing slash is harmless
    for p in parts:
        if p in ("", ".", ".."):
            raise refuse(f"it has a {p!r} path component" if p else "it has an empty path component ('//')")
    rel = "/".join(parts)
    if loc.is_remote:
        return f"{loc.url}/{rel}"
    return os.path.join(loc.path, *parts)


# --------------------------------------------------------------------------------------------------------------
# Redaction

# Mapping keys whose values are credentials (compared case-insensitively, '-' treated as '_').
_SENSITIVE_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "passwd",
        "credentials",
        "authorization",
        "signature",
        "api_key",
        "apikey",
        "access_key",
        "secret_key",
        "session_token",
        "security_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "x_amz_security_token",
        "x_amz_signature",
        "x_amz_credential",
    }
)
# scheme://user:pass@host -> scheme://***@host
# The password part may contain '/' (AWS secrets do); over-redacting a rare 'host:port/path@x' is the safe error.
_USERINFO_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s'\":]+(?::[^@\s'\"]*)?|[^/@\s'\"]+)@"
)
# name=value / name: value / 'name': 'value' for names that are always credentials, in text and query strings.
_KV_RE = re.compile(
    r"(?P<k>(?<![A-Za-z0-9_\-])['\"]?(?:aws_secret_access_key|aws_access_key_id|aws_session_token|secret_access_key|"
    r"access_key_id|session_token|security_token|x-amz-security-token|x-amz-signature|x-amz-credential|signature|"
    r"password|passwd|secret)['\"]?\s*[:=]\s*)"
    r"(?P<q>['\"]?)(?P<v>[^'\"\s,&;)}\]]+)(?P=q)",
    re.IGNORECASE,
)
# 'key': 'value' / "token": "value" only in the quoted form of a dict's repr: the bare words are too common in
# ordinary messages ("key=features/c/0") to redact everywhere.
_QUOTED_KV_RE = re.compile(r"(?P<k>(?P<q1>['\"])(?:key|token)(?P=q1)\s*:\s*)(?P<q>['\"])(?P<v>[^'\"]*)(?P=q)")
# AWS access key ids have a recognisable shape.
_AKID_RE = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}(?![A-Z0-9])")


def secrets_of(opts: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The credential values in s3fs storage options (``key``, ``secret``, ``token``), for :func:`redact`."""
    if not opts:
        return ()
    return tuple(str(opts[k]) for k in ("key", "secret", "token") if opts.get(k))


def redact(value: Any, *, secrets: tuple[str, ...] | list[str] = ()) -> Any:
    """A copy of ``value`` with credentials replaced by ``"***"``; for logs, error messages and attributes.

    - str: URL userinfo (``scheme://user:pass@``), ``key=value`` / ``"secret": "..."`` pairs with sensitive names,
      AWS access key ids, and every occurrence of the given ``secrets`` and of the values of ``AWS_ACCESS_KEY_ID``,
      ``AWS_SECRET_ACCESS_KEY`` and ``AWS_SESSION_TOKEN`` in the environment.
    - Mapping: values under sensitive keys (``key``, ``secret``, ``token``, ``password``, ...) become ``"***"``;
      other values are redacted recursively. Returns a dict.
    - list / tuple / set: redacted element-wise, same container type.
    - anything else: returned unchanged (numbers, None, ...).
    """
    known = [s for s in (*secrets, *(os.environ.get(k, "") for k in _ENV_KEYS)) if isinstance(s, str) and len(s) >= 4]
    # Longest first, so that a secret containing another secret is replaced whole.
    known.sort(key=len, reverse=True)
    return _redact(value, tuple(known))


def _redact(value: Any, known: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return _redact_str(value, known)
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            if isinstance(k, str) and k.lower().replace("-", "_") in _SENSITIVE_KEYS and v is not None:
                out[k] = REDACTED
            else:
                out[_redact(k, known) if isinstance(k, str) else k] = _redact(v, known)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_redact(v, known) for v in value]
        return type(value)(items) if not isinstance(value, list) else items
    return value


def _redact_str(text: str, known: tuple[str, ...]) -> str:
    for s in known:
        text = text.replace(s, REDACTED)
    text = _USERINFO_RE.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    text = _KV_RE.sub(lambda m: f"{m.group('k')}{m.group('q')}{REDACTED}{m.group('q')}", text)
    text = _QUOTED_KV_RE.sub(lambda m: f"{m.group('k')}{m.group('q')}{REDACTED}{m.group('q')}", text)
    text = _AKID_RE.sub(REDACTED, text)
    return text


# --------------------------------------------------------------------------------------------------------------


def _check_endpoint(endpoint_url: Any) -> None:
    if not isinstance(endpoint_url, str) or not re.match(r"^https?://[^/\s]+", endpoint_url):
        shown = redact(endpoint_url) if isinstance(endpoint_url, str) else type(endpoint_url).__name__
        raise InputValueError(
            f"S3 endpoint_url is invalid: expected 'http://host:port' or 'https://host', got {shown!r}. "
            "Fix: set AWS_ENDPOINT_URL or storage_options['endpoint_url'] to the endpoint's full URL."
        )


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value:
        raise InputValueError(f"{name} must be a positive number of seconds, got {value!r}. Fix: pass e.g. 2.0.")
