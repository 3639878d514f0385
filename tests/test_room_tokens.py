"""Private rooms: AUTH_MODE=token makes $connect demand a room token signed with
the secret kept in Secrets Manager (moto here)."""

from __future__ import annotations

import json
import time

import boto3
import pytest

from local import events
from tests.lambda_harness import items

SECRET = "correct horse battery staple, but longer and random"


@pytest.fixture
def private(handler, monkeypatch):
    """The handler in token mode, its secret stored in (moto's) Secrets Manager."""
    arn = boto3.client("secretsmanager").create_secret(Name="room-tokens", SecretString=SECRET)[
        "ARN"
    ]
    monkeypatch.setattr(handler, "AUTH_MODE", "token")
    monkeypatch.setattr(handler, "AUTH_SECRET_ARN", arn)
    handler.auth_secret_cache.clear()
    yield handler
    handler.auth_secret_cache.clear()


def try_connect(handler, **query: str) -> tuple[int, str]:
    response = handler.lambda_handler(events.connect(events.Connection(), query), None)
    problem = json.loads(response["body"])["error"] if "body" in response else ""
    return response["statusCode"], problem


def mint(handler, room: str, ttl: int = 3600) -> str:
    return handler.mint_room_token(SECRET.encode(), room, ttl)


def test_a_valid_token_for_the_room_joins_it(private):
    assert try_connect(private, room="vip", token=mint(private, "vip")) == (200, "")
    assert "ROOM#vip" in {item["PK"] for item in items(private)}


def test_a_missing_token_is_refused_with_401_and_nothing_stored(private):
    status, problem = try_connect(private, room="vip")
    assert status == 401 and "token" in problem
    assert items(private) == []


@pytest.mark.parametrize(
    "token",
    ["", "abc", "123", "123.", ".abc", "123.not-43-chars", "x" * 60, "123." + "a" * 42 + "="],
)
def test_a_malformed_token_is_refused_with_401(private, token):
    assert try_connect(private, room="vip", token=token)[0] == 401
    assert items(private) == []


def test_a_token_for_room_a_is_refused_for_room_b_with_403(private):
    status, problem = try_connect(private, room="b", token=mint(private, "a"))
    assert status == 403 and "not valid for this room" in problem
    assert items(private) == []


def test_an_expired_token_is_refused_with_403(private):
    expired = private.mint_room_token(SECRET.encode(), "vip", 60, now=time.time() - 120)
    status, problem = try_connect(private, room="vip", token=expired)
    assert status == 403 and "expired" in problem
    assert items(private) == []


def test_a_token_with_one_byte_changed_is_refused(private):
    token = mint(private, "vip")
    for position in (0, len(token) // 2, len(token) - 1):
        character = token[position]
        replacement = "A" if character != "A" else "B"
        if character.isdigit():
            replacement = "1" if character != "1" else "2"
        tampered = token[:position] + replacement + token[position + 1 :]
        assert try_connect(private, room="vip", token=tampered)[0] in (401, 403), tampered
    assert items(private) == []


def test_a_token_signed_with_another_secret_is_refused(private):
    forged = private.mint_room_token(b"some other secret", "vip", 3600)
    assert try_connect(private, room="vip", token=forged)[0] == 403


def test_a_repeated_token_parameter_is_refused(private):
    event = events.connect(
        events.Connection(), [("room", "vip"), ("token", mint(private, "vip")), ("token", "x")]
    )
    assert private.lambda_handler(event, None)["statusCode"] == 401


def test_the_secret_is_read_once_per_container(private, monkeypatch):
    reads = []
    real_client = boto3.client

    def counting_client(service, *args, **kwargs):
        client = real_client(service, *args, **kwargs)
        if service == "secretsmanager":
            real_get = client.get_secret_value

            def get_secret_value(**request):
                reads.append(request["SecretId"])
                return real_get(**request)

            client.get_secret_value = get_secret_value
        return client

    monkeypatch.setattr(private.boto3, "client", counting_client)

    for _ in range(3):
        assert try_connect(private, room="vip", token=mint(private, "vip"))[0] == 200

    assert reads == [private.AUTH_SECRET_ARN]


def test_the_secret_and_the_token_never_reach_the_logs(private, capsys):
    token = mint(private, "vip")
    try_connect(private, room="vip", token=token)
    try_connect(private, room="other", token=token)

    output = capsys.readouterr().out
    assert SECRET not in output and token.split(".")[1] not in output


def test_an_unknown_auth_mode_refuses_every_connection(private, monkeypatch):
    monkeypatch.setattr(private, "AUTH_MODE", "tokens")
    assert try_connect(private, room="vip", token=mint(private, "vip"))[0] == 500
    assert items(private) == []


def test_open_mode_needs_no_token(handler):
    assert try_connect(handler, room="lobby") == (200, "")


def test_a_backend_can_import_the_minting_function_without_any_aws_configuration(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    project = Path(__file__).resolve().parent.parent
    script = "import lambda_function as f; print(f.mint_room_token(b'k', 'vip', 60, now=0))"
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(project)}
    environment["AWS_CONFIG_FILE"] = environment["AWS_SHARED_CREDENTIALS_FILE"] = "/dev/null"
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    expiry, signature = done.stdout.strip().split(".")
    assert expiry == "60" and len(signature) == 43
