"""Private rooms on the local stack.

`python -m local serve --auth token` runs the Lambda with AUTH_MODE=token, as a
stack deployed with `AuthMode=token` does: the signing secret lives in Secrets
Manager (moto's, on loopback) and the Lambda reads it from there, once per
worker. The same secret is kept in a file (mode 0600, reused across restarts so
tokens stay valid) for `python -m local token --room NAME`, which mints a token
with the Lambda's own `mint_room_token`, exactly as your backend would.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import boto3

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SECRET_FILE = PROJECT_ROOT / ".tools" / "room-token.secret"
# Secrets Manager takes a secret's name wherever it takes its ARN.
SECRET_NAME = "local-room-tokens"  # noqa: S105 - the name of a secret, not one


def secret_from_file(path: Path) -> str:
    """The secret kept in `path`, made (64 random characters, readable by you only)
    if there is none yet."""
    if path.exists():
        secret = path.read_text().strip()
        if secret:
            return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secret + "\n")
    return secret


def store_secret(endpoint: str, secret: str, region: str, credentials: dict[str, str]) -> None:
    """Put the secret in the Secrets Manager at `endpoint` under SECRET_NAME."""
    client: Any = boto3.client(
        "secretsmanager",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
    )
    try:
        client.create_secret(Name=SECRET_NAME, SecretString=secret)
    except client.exceptions.ResourceExistsException:
        client.put_secret_value(SecretId=SECRET_NAME, SecretString=secret)


def handler_environment(secrets_endpoint: str) -> dict[str, str]:
    """What the Lambda needs to check room tokens against the local Secrets Manager."""
    return {
        "AUTH_MODE": "token",
        "AUTH_SECRET_ARN": SECRET_NAME,
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": secrets_endpoint,
    }


# --- python -m local token ---------------------------------------------------------


def add_token_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--room", required=True, help="the room the token lets its holder join")
    add("--ttl", type=int, default=3600, help="seconds the token is valid (default: %(default)s)")
    add(
        "--secret-file",
        type=Path,
        default=DEFAULT_SECRET_FILE,
        help="where `serve --auth token` keeps the secret (default: %(default)s)",
    )
    add(
        "--url",
        default="ws://127.0.0.1:8080/local",
        help="stage URL shown with the token (default: %(default)s)",
    )


def run_token(arguments: argparse.Namespace) -> int:
    """Print a room token on stdout (so `TOKEN=$(python -m local token --room R)`
    works) and the URL that uses it on stderr."""
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    from lambda_function import ROOM_NAME, mint_room_token

    if not ROOM_NAME.fullmatch(arguments.room):
        print("python -m local token: a room is 1 to 64 of A-Z a-z 0-9 _ . -", file=sys.stderr)
        return 2
    if arguments.ttl <= 0:
        print("python -m local token: --ttl must be more than 0", file=sys.stderr)
        return 2
    if not arguments.secret_file.exists():
        print(
            f"python -m local token: no secret in {arguments.secret_file}; "
            "start the stack with --auth token first (make run AUTH=token)",
            file=sys.stderr,
        )
        return 1
    secret = secret_from_file(arguments.secret_file)
    token = mint_room_token(secret.encode(), arguments.room, arguments.ttl)
    print(token)
    print(f"{arguments.url}?room={arguments.room}&token={token}", file=sys.stderr)
    return 0
