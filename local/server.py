"""`python -m local serve`: DynamoDB, the Lambda runtime and the gateway, started
and stopped in the right order.

Start: the listening socket (its port goes into the handler's CALLBACK_URL),
then DynamoDB and, while it boots, the first Lambda worker; then the table,
then the gateway.
Stop (Ctrl-C or SIGTERM): every connection is closed with 1001 and its
$disconnect runs while the workers and DynamoDB are still up; then the
gateway, the workers and DynamoDB stop, leaving no process behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from local import dynamodb, events, template, tokens
from local.gateway import Gateway, GatewaySettings
from local.runtime import LambdaRuntime, RuntimeSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HANDLER = "lambda_function.lambda_handler"
REGION = "us-east-1"
# The dummy credentials the stack hands the handler; the management API accepts
# calls signed with them (and only them).
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

log = logging.getLogger("local")


@dataclass
class ServeOptions:
    """The `serve` command's flags (see `python -m local --help`)."""

    host: str = "127.0.0.1"
    port: int = 8080
    stage: str = events.DEFAULT_STAGE
    handler: str = DEFAULT_HANDLER
    concurrency: int = 4
    dynamodb: str = "moto"
    table_name: str = "connections"
    template: Path = template.TEMPLATE_PATH
    env: dict[str, str] = field(default_factory=dict)
    function_timeout: float | None = None  # None: the template's Timeout
    report_file: Path | None = None
    ready_file: Path | None = None
    auth: str = "none"  # or "token": private rooms, as with AuthMode=token
    auth_secret_file: Path = tokens.DEFAULT_SECRET_FILE
    gateway: GatewaySettings = field(default_factory=GatewaySettings)


def handler_environment(
    options: ServeOptions,
    template_document: dict[str, Any],
    *,
    callback_url: str,
    dynamodb_endpoint: str,
    memory_size_mb: int,
    function_name: str,
    secrets_endpoint: str | None = None,
) -> dict[str, str]:
    """What the handler's process sees: Lambda's own variables, the template's
    Environment, the local stack's endpoints and dummy credentials, then --env.

    Nothing else leaks in from the shell (no AWS_PROFILE, no ~/.aws files), so the
    handler can only ever reach the local stack unless told otherwise."""
    environment = {
        "PATH": os.environ.get("PATH", os.defpath),
        "LANG": "C.UTF-8",
        "TZ": ":UTC",
        "PYTHONPATH": str(PROJECT_ROOT),
        "LAMBDA_TASK_ROOT": str(Path.cwd()),
        "_HANDLER": options.handler,
        "AWS_LAMBDA_FUNCTION_NAME": function_name,
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_size_mb),
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{function_name}",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        **CREDENTIALS,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    environment.update(template.function_environment(template_document))
    environment.update(
        {
            "TABLE_NAME": options.table_name,
            "CALLBACK_URL": callback_url,
            "AWS_ENDPOINT_URL_DYNAMODB": dynamodb_endpoint,
            # The gateway serves Lambda's Invoke API too, for the handler's hand-offs.
            "AWS_ENDPOINT_URL_LAMBDA": callback_url.rsplit("/", 1)[0],
        }
    )
    if options.auth == "token" and secrets_endpoint:
        environment.update(tokens.handler_environment(secrets_endpoint))
    environment.update(options.env)
    return environment


def listen(host: str, port: int) -> socket.socket:
    """Bind before anything starts, so a port in use fails fast and port 0 is known."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def serve(options: ServeOptions) -> None:
    """Run the stack until Ctrl-C or SIGTERM."""
    # The gateway answers Sec-WebSocket-Protocol itself, from the handler's response;
    # aiohttp's own negotiation, unused, would warn about every client that offers one.
    logging.getLogger("aiohttp.websocket").setLevel(logging.ERROR)
    template_document = template.load(options.template)
    sock = listen(options.host, options.port)
    try:
        # Started from the main thread: children are told to die with the thread
        # that started them (see processes.die_with_parent).
        database = dynamodb.launch(options.dynamodb)
        # Room tokens need a Secrets Manager: moto's server has one, DynamoDB Local not.
        secrets_server = None
        if options.auth == "token" and database.kind != "moto":
            secrets_server = dynamodb.launch("moto")
        try:
            asyncio.run(_serve(options, template_document, sock, database, secrets_server))
        finally:
            database.stop()
            if secrets_server is not None:
                secrets_server.stop()
    finally:
        sock.close()


def _prepare_table(
    database: dynamodb.DynamoDB, table_name: str, template_document: dict[str, Any]
) -> None:
    dynamodb.wait_until_ready(database, REGION, CREDENTIALS)
    dynamodb.ensure_table(
        database,
        table_name,
        region=REGION,
        credentials=CREDENTIALS,
        template_document=template_document,
    )


def _prepare_room_tokens(secrets_server: dynamodb.DynamoDB, secret_file: Path) -> None:
    dynamodb.wait_until_ready(secrets_server, REGION, CREDENTIALS)
    secret = tokens.secret_from_file(secret_file)
    tokens.store_secret(secrets_server.endpoint, secret, REGION, CREDENTIALS)


async def _serve(
    options: ServeOptions,
    template_document: dict[str, Any],
    sock: socket.socket,
    database: dynamodb.DynamoDB,
    secrets_server: dynamodb.DynamoDB | None = None,
) -> None:
    api = template.api(template_document)
    credentials = {CREDENTIALS["AWS_ACCESS_KEY_ID"]: CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    settings = options.gateway
    settings.stage, settings.region, settings.credentials = options.stage, REGION, credentials
    port = sock.getsockname()[1]
    host = "127.0.0.1" if options.host in ("0.0.0.0", "") else options.host  # noqa: S104 - displayed URL only
    http_url = f"http://{host}:{port}"
    callback_url = f"{http_url}/{options.stage}"

    runtime: LambdaRuntime | None = None
    runner: web.AppRunner | None = None
    try:
        memory_size_mb = int(template.function_setting("MemorySize", template_document) or 128)
        timeout = options.function_timeout or float(
            template.function_setting("Timeout", template_document) or 3
        )
        function_name = f"{options.stage}-{_function_logical_id(template_document)}"
        runtime = LambdaRuntime(
            RuntimeSettings(
                handler=options.handler,
                environment=handler_environment(
                    options,
                    template_document,
                    callback_url=callback_url,
                    dynamodb_endpoint=database.endpoint,
                    memory_size_mb=memory_size_mb,
                    function_name=function_name,
                    secrets_endpoint=(secrets_server or database).endpoint,
                ),
                concurrency=options.concurrency,
                memory_size_mb=memory_size_mb,
                timeout_seconds=timeout,
                function_name=function_name,
                region=REGION,
                working_directory=Path.cwd(),
                report_file=options.report_file,
            )
        )
        # DynamoDB boots while the first Lambda worker imports the handler.
        preparations = [
            asyncio.to_thread(_prepare_table, database, options.table_name, template_document),
            runtime.start(),
        ]
        if options.auth == "token":
            preparations.append(
                asyncio.to_thread(
                    _prepare_room_tokens, secrets_server or database, options.auth_secret_file
                )
            )
        await asyncio.gather(*preparations)
        gateway = Gateway(settings, api, runtime)
        runner = web.AppRunner(gateway.application(), access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, sock, backlog=4096, shutdown_timeout=1.0).start()

        ready = {
            "wsUrl": f"ws://{host}:{port}/{options.stage}",
            "httpUrl": http_url,
            "callbackUrl": callback_url,
            "tableName": options.table_name,
            "dynamodb": database.kind,
            "dynamodbEndpoint": database.endpoint,
            "region": REGION,
            "credentials": CREDENTIALS,
            "pid": os.getpid(),
        }
        _announce(ready, options, settings)
        await _until_stopped()
        print("Stopping: closing connections (1001) and running their $disconnects", flush=True)
        await gateway.shutdown(timeout=settings.integration_timeout + settings.close_timeout + 1)
    finally:
        if runner is not None:
            await runner.cleanup()
        if runtime is not None:
            await runtime.stop()


def _function_logical_id(template_document: dict[str, Any]) -> str:
    names = list(template.resources(template_document, "AWS::Lambda::Function"))
    return names[0] if names else "Function"


def _announce(ready: dict[str, Any], options: ServeOptions, settings: GatewaySettings) -> None:
    keys = options.env
    print(
        f"WebSocket API:  {ready['wsUrl']}\n"
        f"Management API: {ready['callbackUrl']}/@connections/{{connectionId}}"
        f" (SigV4: {CREDENTIALS['AWS_ACCESS_KEY_ID']} / {CREDENTIALS['AWS_SECRET_ACCESS_KEY']},"
        f" {REGION}{'' if settings.verify_sigv4 else '; signatures not checked'})\n"
        f"Chat page:      {ready['httpUrl']}/\n"
        f"Handler:        {options.handler} (up to {options.concurrency} workers"
        f"{', env ' + ' '.join(keys) if keys else ''})\n"
        f"DynamoDB:       {ready['dynamodb']} at {ready['dynamodbEndpoint']},"
        f" table {ready['tableName']}\n"
        + (
            f"Private rooms:  a token per room: python -m local token --room NAME"
            f" (secret in {options.auth_secret_file})\n"
            if options.auth == "token"
            else ""
        )
        + "Ready. Ctrl-C stops.",
        flush=True,
    )
    if options.ready_file is not None:
        partial = options.ready_file.with_suffix(".partial")
        partial.write_text(json.dumps(ready))
        partial.replace(options.ready_file)


async def _until_stopped() -> None:
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stopped.set)
    await stopped.wait()
    # A second Ctrl-C while connections close stops at once (children die with us).
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(signal_number)
