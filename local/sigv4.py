"""Check the SigV4 signature of a management API call, as API Gateway does.

The `@connections` API only answers callers whose request is signed (service
`execute-api`) with credentials allowed to manage connections. The emulator
knows one set of credentials, the ones it hands the Lambda, and recomputes the
signature from what arrived: the method, the raw, still percent-encoded path
(the signer encoded it, so decoding it first would change the canonical
request), the query string, the signed headers, `X-Amz-Date` and the body. The
canonical request and the string to sign are botocore's own SigV4Auth, so the
check can only disagree with the signer if the request was changed on the way,
or signed with other keys.

It runs on every post, so it is kept cheap (~50 µs): no AWSRequest preparation
(the body's hash is computed once, directly) and one derived signing key per
access key and day, as AWS's own services cache it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import HeadersDict
from botocore.credentials import Credentials

SERVICE = "execute-api"
ALGORITHM = "AWS4-HMAC-SHA256"
# AWS refuses a signature dated more than five minutes away from its clock.
MAX_CLOCK_SKEW = timedelta(minutes=5)

_AUTHORIZATION = re.compile(
    ALGORITHM + r"\s+Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed_headers>[^,\s]+),\s*Signature=(?P<signature>[0-9a-f]{64})\s*$"
)
_AMZ_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z")

MISSING_TOKEN = "Missing Authentication Token"  # noqa: S105 - AWS's error text, not a secret
MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method."
)


class _ReceivedRequest:
    """What SigV4Auth reads of a request (method, url, headers, body, params, context),
    rebuilt from what the server received."""

    def __init__(
        self, method: str, url: str, headers: HeadersDict, body: bytes, amz_date: str
    ) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
        self.params: dict[str, Any] = {}
        self.context = {"timestamp": amz_date}


@lru_cache(maxsize=64)
def _signer(access_key: str, secret_key: str, region: str, service: str) -> SigV4Auth:
    return SigV4Auth(Credentials(access_key, secret_key), service, region)


@lru_cache(maxsize=64)
def _signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    """kSigning = HMAC chain of the date, region, service and "aws4_request"."""
    key = ("AWS4" + secret_key).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def verify(
    *,
    method: str,
    host: str,
    raw_path: str,
    headers: Mapping[str, str],
    body: bytes,
    secrets: Mapping[str, str],
    region: str,
    service: str = SERVICE,
    now: datetime | None = None,
) -> str | None:
    """None when the request is signed by one of `secrets` (access key id -> secret
    key) for `region`; otherwise the reason it is refused, worded as AWS words it.

    `raw_path` includes the query string, if any, exactly as received.
    """
    headers = {name.lower(): value for name, value in headers.items()}
    authorization = headers.get("authorization")
    if not authorization:
        return MISSING_TOKEN
    parsed = _AUTHORIZATION.match(authorization.strip())
    if not parsed:
        return f"Authorization header is not a valid {ALGORITHM} signature: {authorization!r}"
    credential = parsed["credential"].split("/")
    if len(credential) != 5 or credential[4] != "aws4_request":
        expected = "<key>/<date>/<region>/<service>/aws4_request"
        return f"Credential should be {expected}, got {parsed['credential']!r}"
    access_key, scope_date, scope_region, scope_service, _ = credential
    if access_key not in secrets:
        return "The security token included in the request is invalid."
    if scope_region != region:
        return f"Credential should be scoped to a valid region, not '{scope_region}'."
    if scope_service != service:
        return f"Credential should be scoped to correct service: '{service}'."

    amz_date = headers.get("x-amz-date", "")
    date_parts = _AMZ_DATE.fullmatch(amz_date)
    if date_parts is None:
        return "Authorization requires a valid X-Amz-Date header (yyyyMMddTHHmmssZ)."
    signed_at = datetime(*map(int, date_parts.groups()), tzinfo=UTC)
    if not amz_date.startswith(scope_date):
        return "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date."
    if abs((now or datetime.now(UTC)) - signed_at) > MAX_CLOCK_SKEW:
        return f"Signature expired: {amz_date} is more than 5 minutes from the current time."

    signed_names = parsed["signed_headers"].split(";")
    missing = [name for name in signed_names if name not in headers]
    if missing:
        return f"Signed header(s) missing from the request: {', '.join(missing)}"
    request = _ReceivedRequest(
        method,
        f"http://{host}{raw_path}",
        HeadersDict({name: headers[name] for name in signed_names}),
        body,
        amz_date,
    )
    signer = _signer(access_key, secrets[access_key], region, service)
    string_to_sign = signer.string_to_sign(request, signer.canonical_request(request))
    key = _signing_key(secrets[access_key], scope_date, region, service)
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, parsed["signature"]):
        return MISMATCH
    return None
