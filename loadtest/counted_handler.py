"""lambda_function.lambda_handler as the fan-out benchmark hosts it: unchanged, with a
botocore hook that counts its DynamoDB Query calls (one per page of the room) and
appends each broadcast's count to the file named by $BENCH_PAGES_FILE. The hook is
one Python call per Query; nothing else differs from the deployed handler."""

from __future__ import annotations

import os
from typing import Any

import lambda_function

query_pages: list[int] = []
lambda_function.dynamodb.meta.events.register(
    "before-call.dynamodb.Query", lambda **_: query_pages.append(1)
)


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    query_pages.clear()
    response = lambda_function.lambda_handler(event, context)
    if event.get("requestContext", {}).get("routeKey") == "message":
        with open(os.environ["BENCH_PAGES_FILE"], "a") as pages_file:
            pages_file.write(f"{len(query_pages)}\n")
    return response
