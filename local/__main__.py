"""`python -m local [COMMAND] [flags]`: the local stack's command line.

Commands (serve is the default):
  serve   run API Gateway + Lambda + DynamoDB on 127.0.0.1 (what `make run` does)
  chat    chat in a room from the terminal (what `make chat` does)
  token   mint a room token for a stack started with --auth token

Each command is one entry of COMMANDS: a function that adds its flags to a
parser, and the function that runs it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from local import chat, dynamodb, events, runtime, template, tokens
from local.gateway import GatewaySettings
from local.selection import ExpressionError
from local.server import DEFAULT_HANDLER, ServeOptions, serve


def _env_pair(text: str) -> tuple[str, str]:
    name, separator, value = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return name, value


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a rate is between 0 and 1, not {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = GatewaySettings()
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=8080, help="port; 0 picks a free one (default: %(default)s)")
    add(
        "--stage",
        default=events.DEFAULT_STAGE,
        help="stage name, the URL path (default: %(default)s)",
    )
    add(
        "--handler",
        default=DEFAULT_HANDLER,
        help="the Lambda, as module.function (default: %(default)s)",
    )
    add("--concurrency", type=_count, default=4, help="most Lambda workers (default: %(default)s)")
    add(
        "--dynamodb",
        default=os.environ.get("AWS_ENDPOINT_URL_DYNAMODB") or "moto",
        help="moto, local (DynamoDB Local, needs java) or an endpoint URL "
        "(default: $AWS_ENDPOINT_URL_DYNAMODB, else moto)",
    )
    add("--table-name", default="connections", help="the connections table (default: %(default)s)")
    add(
        "--template",
        type=Path,
        default=template.TEMPLATE_PATH,
        help="CloudFormation template to emulate",
    )
    add(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a variable of the handler's environment (repeatable)",
    )
    add(
        "--idle-timeout",
        type=_positive,
        default=defaults.idle_timeout,
        help="seconds without data before close 1001 (default: %(default)s)",
    )
    add(
        "--max-duration",
        type=_positive,
        default=defaults.max_duration,
        help="seconds a connection may last (default: %(default)s)",
    )
    add(
        "--integration-timeout",
        type=_positive,
        default=defaults.integration_timeout,
        help="seconds the gateway waits for the handler (default: %(default)s)",
    )
    add(
        "--function-timeout",
        type=_positive,
        default=None,
        help="seconds before a worker is stopped (default: the template's Timeout)",
    )
    add(
        "--max-frame-bytes",
        type=_count,
        default=defaults.max_frame_bytes,
        help="largest inbound frame (default: %(default)s)",
    )
    add(
        "--max-message-bytes",
        type=_count,
        default=defaults.max_message_bytes,
        help="largest inbound message or post (default: %(default)s)",
    )
    add(
        "--post-latency-ms",
        type=float,
        default=0.0,
        help="delay added to each management API call (default: 0)",
    )
    add(
        "--connect-latency-ms",
        type=float,
        default=0.0,
        help="delay between $connect's 2xx and the open connection; posts to it "
        "meanwhile get 410 (default: 0)",
    )
    add(
        "--fault-gone-rate",
        type=_rate,
        default=0.0,
        help="share of posts whose recipient is dropped and answered 410",
    )
    add(
        "--fault-throttle-rate",
        type=_rate,
        default=0.0,
        help="share of posts answered 429 and not delivered",
    )
    add("--fault-seed", type=int, default=None, help="seed of the fault injection's random numbers")
    add(
        "--no-verify-sigv4",
        dest="verify_sigv4",
        action="store_false",
        help="accept unsigned management API calls",
    )
    add(
        "--report-file",
        type=Path,
        default=None,
        help="append each invocation's REPORT figures here as JSON lines",
    )
    add(
        "--ready-file",
        type=Path,
        default=None,
        help="write the stack's URLs here (JSON) once it is ready",
    )
    add(
        "--auth",
        choices=("none", "token"),
        default="none",
        help="none: open rooms; token: joining a room takes a token "
        "(python -m local token) (default: %(default)s)",
    )
    add(
        "--auth-secret-file",
        type=Path,
        default=tokens.DEFAULT_SECRET_FILE,
        help="where the room-token secret is kept (default: %(default)s)",
    )
    add("--log-level", default="WARNING", help="the gateway's own log level (default: %(default)s)")


def run_serve(arguments: argparse.Namespace) -> int:
    gateway = GatewaySettings(
        idle_timeout=arguments.idle_timeout,
        max_duration=arguments.max_duration,
        integration_timeout=arguments.integration_timeout,
        max_frame_bytes=arguments.max_frame_bytes,
        max_message_bytes=arguments.max_message_bytes,
        post_latency_ms=arguments.post_latency_ms,
        connect_latency_ms=arguments.connect_latency_ms,
        fault_gone_rate=arguments.fault_gone_rate,
        fault_throttle_rate=arguments.fault_throttle_rate,
        fault_seed=arguments.fault_seed,
        verify_sigv4=arguments.verify_sigv4,
    )
    options = ServeOptions(
        host=arguments.host,
        port=arguments.port,
        stage=arguments.stage,
        handler=arguments.handler,
        concurrency=arguments.concurrency,
        dynamodb=arguments.dynamodb,
        table_name=arguments.table_name,
        template=arguments.template,
        env=dict(arguments.env),
        function_timeout=arguments.function_timeout,
        report_file=arguments.report_file,
        ready_file=arguments.ready_file,
        auth=arguments.auth,
        auth_secret_file=arguments.auth_secret_file,
        gateway=gateway,
    )
    try:
        serve(options)
    except (dynamodb.DynamoDBError, runtime.HandlerInitError, ExpressionError) as error:
        print(f"python -m local: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(
            f"python -m local: cannot listen on {arguments.host}:{arguments.port}: {error}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]
COMMANDS: dict[str, Command] = {
    "serve": (add_serve_arguments, run_serve, "run the local stack (the default command)"),
    "chat": (chat.add_chat_arguments, chat.run_chat, "chat in a room from the terminal"),
    "token": (tokens.add_token_arguments, tokens.run_token, "mint a room token (--auth token)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    parser = argparse.ArgumentParser(prog="python -m local", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, run, summary) in COMMANDS.items():
        command_parser = commands.add_parser(name, help=summary, description=summary)
        add_arguments(command_parser)
        command_parser.set_defaults(run=run)
    arguments = parser.parse_args(argv)
    level = getattr(arguments, "log_level", "WARNING")
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return arguments.run(arguments)


if __name__ == "__main__":
    sys.exit(main())
