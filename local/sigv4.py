"""Check the SigV4 signature of a management API call, as API Gateway does.

The `@connections` API only answers callers whose request is signed (service
`execute-api`) with credentials allowed to manage connections. The emulator
knows one set of credentials, the ones it hands the Lambda, and recomputes the
signature from what arrived: the method, the raw, still percent-encoded path
(the signer encoded it, so decoding it first would change the canonical
request), the query string, the signed headers, `X-Amz-Date` and the body. The
arithmetic is botocore's own SigV4Auth, so the check can only disagree with the
signer if the request was changed on the way, or signed with other keys.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

SERVICE = "execute-api"
ALGORITHM = "AWS4-HMAC-SHA256"
# AWS refuses a signature dated more than five minutes away from its clock.
MAX_CLOCK_SKEW = timedelta(minutes=5)

_AUTHORIZATION = re.compile(
    ALGORITHM + r"\s+Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed_headers>[^,\s]+),\s*Signature=(?P<signature>[0-9a-f]{64})\s*$"
)

MISSING_TOKEN = "Missing Authentication Token"  # noqa: S105 - AWS's error text, not a secret
MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method."
)


def verify(
    *,
    method: str,
    host: str,
    raw_path: str,
    headers: Mapping[str, str],
    body: bytes,
    secrets: Mapping[str, str],
    region: str,
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
    if scope_service != SERVICE:
        return f"Credential should be scoped to correct service: '{SERVICE}'."

    amz_date = headers.get("x-amz-date", "")
    try:
        signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "Authorization requires a valid X-Amz-Date header (yyyyMMddTHHmmssZ)."
    if not amz_date.startswith(scope_date):
        return "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date."
    if abs((now or datetime.now(UTC)) - signed_at) > MAX_CLOCK_SKEW:
        return f"Signature expired: {amz_date} is more than 5 minutes from the current time."

    signed_names = parsed["signed_headers"].split(";")
    missing = [name for name in signed_names if name not in headers]
    if missing:
        return f"Signed header(s) missing from the request: {', '.join(missing)}"
    request = AWSRequest(
        method=method,
        url=f"http://{host}{raw_path}",
        headers={name: headers[name] for name in signed_names},
        data=body,
    )
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(access_key, secrets[access_key]), SERVICE, region)
    string_to_sign = signer.string_to_sign(request, signer.canonical_request(request))
    expected = signer.signature(string_to_sign, request)
    if not hmac.compare_digest(expected, parsed["signature"]):
        return MISMATCH
    return None
