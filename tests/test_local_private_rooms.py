"""Private rooms on the local stack: `serve --auth token` keeps the secret in
(moto's) Secrets Manager for the unchanged Lambda, and `python -m local token`
mints tokens with the Lambda's own function, as a user's backend would."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import websocket

from tests.local_harness import connect

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("private") / "room-token.secret"


@pytest.fixture(scope="module")
def private_stack(stack_factory: Any, secret_file: Path) -> Any:
    return stack_factory(
        handler="lambda_function.lambda_handler",
        extra_args=["--auth", "token", "--auth-secret-file", str(secret_file)],
    )[0]


def mint(secret_file: Path, room: str, *extra: str) -> subprocess.CompletedProcess[str]:
    arguments = ["token", "--room", room, "--secret-file", str(secret_file), *extra]
    return subprocess.run(
        [sys.executable, "-m", "local", *arguments],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def refusal(url: str) -> int:
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        connect(url)
    return refused.value.status_code


def test_a_minted_token_joins_its_room_and_the_room_works(
    private_stack: Any, secret_file: Path
) -> None:
    token = mint(secret_file, "vip").stdout.strip()
    url = f"{private_stack.ws_url}?room=vip&token={token}"
    first, second = connect(url), connect(url)

    first.send('{"action":"message","messageBody":"members only"}')

    assert '"messageBody":"members only"' in second.recv()


def test_without_a_token_the_handshake_is_refused_with_401(private_stack: Any) -> None:
    assert refusal(f"{private_stack.ws_url}?room=vip") == 401


def test_a_token_for_another_room_is_refused_with_403(
    private_stack: Any, secret_file: Path
) -> None:
    token = mint(secret_file, "vip").stdout.strip()
    assert refusal(f"{private_stack.ws_url}?room=lobby&token={token}") == 403


def test_the_secret_file_is_private_and_the_secret_never_logged(
    private_stack: Any, secret_file: Path
) -> None:
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_text().strip()
    assert len(secret) >= 48
    connect(f"{private_stack.ws_url}?room=vip&token={mint(secret_file, 'vip').stdout.strip()}")
    assert secret not in private_stack.log()
    assert "python -m local token --room NAME" in private_stack.log()


def test_the_token_command_prints_the_url_that_uses_the_token(secret_file: Path) -> None:
    minted = mint(secret_file, "vip", "--url", "ws://127.0.0.1:9999/local")
    assert minted.returncode == 0
    assert (
        minted.stderr.strip() == f"ws://127.0.0.1:9999/local?room=vip&token={minted.stdout.strip()}"
    )


def test_the_token_command_without_a_secret_says_how_to_get_one(tmp_path: Path) -> None:
    minted = mint(tmp_path / "missing.secret", "vip")
    assert minted.returncode == 1 and "--auth token" in minted.stderr
    assert minted.stdout == ""


def test_the_token_command_refuses_a_bad_room(secret_file: Path) -> None:
    minted = mint(secret_file, "no#room")
    assert minted.returncode == 2 and "room" in minted.stderr
