"""A Lambda the tests script through what they send, hosted with --handler.

Every event is appended to $RECORD_FILE (one JSON object per line: the event
and a few context attributes), so tests can check exactly what the emulator
handed the Lambda. What the handler does is driven by the request:

$connect, from the query string:
  status=N      return statusCode N (default 200)
  protocol=P    return the header Sec-WebSocket-Protocol: P
  raise=1       raise an exception
  post_self=1   post to its own connection id (still in $connect) and record the outcome
  result=none   return None instead of a response object
  sleep=S       take S seconds

an event that is not API Gateway's (a direct Invoke): return {"invoked": event}

message routes, from the frame's JSON `do`:
  "whoami"      reply {"connectionId", "requestId", "pid"}
  "count"       reply with a module-level counter (kept between invocations) and the pid
  "raise"       raise an exception
  "sleep"       sleep `seconds`, then reply
  "crash"       SIGKILL its own worker process mid-invocation
  "no_body"     return {"statusCode": 200} without a body
  "bad_body"    return a body that is not a string
  anything else reply {"route": routeKey, "body": the frame}
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import boto3

invocations = 0


def record(kind: str, payload: dict[str, Any]) -> None:
    path = os.environ.get("RECORD_FILE")
    if path:
        with open(path, "a") as file:
            file.write(json.dumps({"kind": kind, **payload}) + "\n")


def handler(event: dict[str, Any], context: Any) -> Any:
    global invocations
    invocations += 1
    record(
        "event",
        {
            "event": event,
            "context": {
                "aws_request_id": context.aws_request_id,
                "function_name": context.function_name,
                "memory_limit_in_mb": context.memory_limit_in_mb,
                "invoked_function_arn": context.invoked_function_arn,
                "log_group_name": context.log_group_name,
                "log_stream_name": context.log_stream_name,
                "remaining_ms": context.get_remaining_time_in_millis(),
            },
            "environment": {
                name: os.environ.get(name)
                for name in (
                    "TABLE_NAME",
                    "CALLBACK_URL",
                    "AWS_ENDPOINT_URL_DYNAMODB",
                    "AWS_REGION",
                    "DEFAULT_ROOM",
                    "EXTRA",
                )
            },
        },
    )
    if "requestContext" not in event:
        return {"invoked": event}  # a direct Invoke, through Lambda's API
    route = event["requestContext"]["routeKey"]
    if route == "$connect":
        return connect(event)
    if route == "$disconnect":
        return {"statusCode": 200}
    return message(event, context)


def connect(event: dict[str, Any]) -> Any:
    query = event.get("queryStringParameters") or {}
    time.sleep(float(query.get("sleep", 0)))
    if query.get("raise"):
        raise RuntimeError("refused by the test")
    if query.get("post_self"):
        record("post_self", {"outcome": post_to(event["requestContext"]["connectionId"], "early")})
    if query.get("result") == "none":
        return None
    response: dict[str, Any] = {"statusCode": int(query.get("status", "200"))}
    if "protocol" in query:
        response["headers"] = {"Sec-WebSocket-Protocol": query["protocol"]}
    return response


def post_to(connection_id: str, data: str) -> str:
    client = boto3.client("apigatewaymanagementapi", endpoint_url=os.environ["CALLBACK_URL"])
    try:
        client.post_to_connection(ConnectionId=connection_id, Data=data.encode())
    except client.exceptions.GoneException:
        return "GoneException"
    return "delivered"


def message(event: dict[str, Any], context: Any) -> Any:
    try:
        frame = json.loads(event["body"])
    except ValueError:
        frame = {}
    action = frame.get("do") if isinstance(frame, dict) else None
    context_fields = event["requestContext"]
    if action == "raise":
        raise ValueError("the test asked for an exception")
    if action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "sleep":
        time.sleep(float(frame.get("seconds", 1)))
    if action == "no_body":
        return {"statusCode": 200}
    if action == "bad_body":
        return {"statusCode": 200, "body": {"not": "a string"}}
    if action == "whoami":
        reply = {
            "connectionId": context_fields["connectionId"],
            "requestId": context_fields["requestId"],
            "pid": os.getpid(),
        }
    elif action == "count":
        reply = {"count": invocations, "pid": os.getpid()}
    else:
        reply = {"route": context_fields["routeKey"], "body": event["body"]}
    return {"statusCode": 200, "body": json.dumps(reply)}
