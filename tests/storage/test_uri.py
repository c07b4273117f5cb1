"""phpn_core.storage.uri: parsing and validation of storage URIs, storage options, safe joins and redaction."""

from __future__ import annotations

import os
import posixpath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phpn_core.errors import InputValueError
from phpn_core.storage.uri import (
    REDACTED,
    build_storage_options,
    is_remote,
    parse_uri,
    redact,
    resolve_storage_options,
    safe_join,
)

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


# -- parse_uri -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, bucket, path",
    [
        ("s3://my-bucket", "my-bucket", ""),
        ("s3://my-bucket/", "my-bucket", ""),
        ("s3://my-bucket/runs/a/features/", "my-bucket", "runs/a/features"),
        ("s3://my.bucket.01//runs//a", "my.bucket.01", "runs/a"),
    ],
)
def test_parse_s3(uri, bucket, path):
    loc = parse_uri(uri)
    assert (loc.scheme, loc.bucket, loc.path) == ("s3", bucket, path)
    assert loc.is_remote and is_remote(uri)
    assert parse_uri(loc.url) == loc  # the canonical form parses to itself


def test_parse_local(tmp_path):
    for uri in (tmp_path / "x", str(tmp_path / "x"), f"file://{tmp_path}/x"):
        loc = parse_uri(uri)
        assert (loc.scheme, loc.bucket, loc.path) == ("file", None, str(tmp_path / "x"))
        assert not loc.is_remote and str(loc) == str(tmp_path / "x")
    assert parse_uri("rel/dir").path == os.path.abspath("rel/dir")


@pytest.mark.parametrize(
    "uri, fragment",
    [
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("s3://Bad_Bucket/x", "invalid"),
        ("s3://ab/x", "invalid"),
        ("s3://bucket/a/../b", "'..'"),
        ("gs://bucket/x", "Unsupported storage scheme"),
        ("file://relative/x", "not absolute"),
        ("", "empty"),
        ("   ", "empty"),
    ],
)
def test_parse_refuses(uri, fragment):
    with pytest.raises(InputValueError, match=fragment) as err:
        parse_uri(uri)
    msg = str(err.value)
    assert "expected" in msg and "Fix" in msg


def test_parse_refuses_credentials_in_uri_without_echoing_them():
    with pytest.raises(InputValueError, match="embeds credentials") as err:
        parse_uri(f"s3://{KEY_ID}:{SECRET}@bucket/x")
    assert SECRET not in str(err.value) and KEY_ID not in str(err.value)


def test_parse_refuses_non_strings():
    with pytest.raises(InputValueError, match="wrong type"):
        parse_uri(42)  # type: ignore[arg-type]


# -- storage options -------------------------------------------------------------------------------------------------


def test_build_storage_options_from_env_and_explicit_args():
    env = {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "eu-west-1",
    }
    opts = build_storage_options(env=env)
    assert opts["endpoint_url"] == "http://minio:9000"
    assert (opts["key"], opts["secret"]) == (KEY_ID, SECRET)
    assert opts["client_kwargs"] == {"region_name": "eu-west-1"}
    cfg = opts["config_kwargs"]
    assert cfg["connect_timeout"] <= 5 and cfg["retries"]["max_attempts"] <= 5  # bounded failure on a dead endpoint

    explicit = build_storage_options(endpoint_url="https://s3.example.com", key="k2", secret="s2", region="us-east-1",
                                     env=env)
    assert explicit["endpoint_url"] == "https://s3.example.com" and explicit["key"] == "k2"
    assert explicit["client_kwargs"] == {"region_name": "us-east-1"}

    bare = build_storage_options(env={})  # nothing set: boto's default credential chain applies
    assert "key" not in bare and "endpoint_url" not in bare and "config_kwargs" in bare


def test_build_storage_options_refuses_bad_values():
    with pytest.raises(InputValueError, match="Incomplete S3 credentials") as err:
        build_storage_options(env={"AWS_SECRET_ACCESS_KEY": SECRET})
    assert SECRET not in str(err.value)
    with pytest.raises(InputValueError, match="endpoint_url is invalid"):
        build_storage_options(endpoint_url="minio:9000", env={})
    with pytest.raises(InputValueError, match="connect_timeout"):
        build_storage_options(connect_timeout=0, env={})
    with pytest.raises(InputValueError, match="max_attempts"):
        build_storage_options(max_attempts=0, env={})


def test_resolve_storage_options(monkeypatch, tmp_path):
    assert resolve_storage_options(tmp_path, {"key": "ignored"}) is None  # local files take no options
    given = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s", "config_kwargs": {"connect_timeout": 7}}
    opts = resolve_storage_options("s3://bucket/x", given)
    assert opts["config_kwargs"]["connect_timeout"] == 7  # the caller's choice wins
    assert "retries" in opts["config_kwargs"] and "read_timeout" in opts["config_kwargs"]
    assert given["config_kwargs"] == {"connect_timeout": 7}  # not mutated
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert resolve_storage_options("s3://bucket/x")["endpoint_url"] == "http://from-env:9000"
    with pytest.raises(InputValueError, match="no bucket"):
        resolve_storage_options("s3://")


# -- safe_join -------------------------------------------------------------------------------------------------------


def test_safe_join_accepts_plain_relative_names(tmp_path):
    assert safe_join("s3://bucket/runs", "features") == "s3://bucket/runs/features"
    assert safe_join("s3://bucket/runs/", "class_003/maps") == "s3://bucket/runs/class_003/maps"
    assert safe_join("s3://bucket", "x") == "s3://bucket/x"
    assert safe_join(tmp_path, "a/b") == os.path.join(str(tmp_path), "a", "b")
    assert safe_join(tmp_path, "..hidden") == os.path.join(str(tmp_path), "..hidden")  # not a '..' component


@pytest.mark.parametrize(
    "name", ["", "..", "../x", "a/../../b", "./a", "a/./b", "a//b", "/etc/passwd", "~/x", "C:\\x", "a\\b",
             "s3://other/x", "a\x00b", "a\nb"],
)
def test_safe_join_refuses_escaping_names(name):
    with pytest.raises(InputValueError, match="Unsafe name"):
        safe_join("s3://bucket/root", name)
    with pytest.raises(InputValueError, match="Unsafe name"):
        safe_join("/tmp/root", name)


def test_safe_join_refuses_bucketless_root_and_non_strings():
    with pytest.raises(InputValueError, match="no bucket"):
        safe_join("s3://", "x")
    with pytest.raises(InputValueError, match="wrong type"):
        safe_join("/tmp", 3)  # type: ignore[arg-type]


_components = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/\\\x00", min_codepoint=32),
                      min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.one_of(_components, st.sampled_from(["..", ".", ""])), min_size=1, max_size=4))
def test_safe_join_never_escapes_root(parts):
    name = "/".join(parts)
    root = "/srv/phpn/root"
    try:
        joined = safe_join(root, name)
    except InputValueError:
        return
    # Accepted names resolve inside root, as one or more real components.
    assert posixpath.normpath(joined).startswith(root + "/")
    assert ".." not in joined.split("/") and joined != root


# -- redact ----------------------------------------------------------------------------------------------------------


def test_redact_mappings_nested_and_not_mutated():
    opts = {
        "endpoint_url": "http://user:pw@minio:9000",
        "key": KEY_ID,
        "secret": SECRET,
        "token": None,
        "client_kwargs": {"region_name": "us-east-1", "aws_session_token": "tok-123456"},
        "config_kwargs": {"retries": {"max_attempts": 3}},
    }
    out = redact(opts)
    assert out["key"] == REDACTED and out["secret"] == REDACTED and out["token"] is None
    assert out["client_kwargs"] == {"region_name": "us-east-1", "aws_session_token": REDACTED}
    assert out["endpoint_url"] == "http://***@minio:9000"
    assert out["config_kwargs"] == {"retries": {"max_attempts": 3}}
    assert opts["secret"] == SECRET  # a copy
    assert SECRET not in repr(out) and KEY_ID not in repr(out) and "pw" not in out["endpoint_url"]


def test_redact_strings():
    text = (
        f"failed with {{'key': '{KEY_ID}', 'secret': '{SECRET}'}} at https://u:p4ss@host/b?X-Amz-Signature=abc123"
        f"&X-Amz-Credential=cred1&x=1; aws_secret_access_key={SECRET} password: hunter22"
    )
    out = redact(text)
    for leaked in (SECRET, KEY_ID, "p4ss", "abc123", "cred1", "hunter22"):
        assert leaked not in out, leaked
    assert "x=1" in out and "https://***@host/b" in out
    # ordinary words stay readable: object keys and digests are not secrets
    plain = "NoSuchKey: key=features/c/0 digest=0123456789abcdef"
    assert redact(plain) == plain


def test_redact_known_secrets_and_environment(monkeypatch):
    assert redact("token is s3cr3t-value here", secrets=["s3cr3t-value"]) == f"token is {REDACTED} here"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-987")
    assert redact(["x env-secret-987", ("env-secret-987",)]) == [f"x {REDACTED}", (REDACTED,)]
    assert redact(3) == 3 and redact(None) is None
