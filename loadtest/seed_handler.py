"""The baseline the fan-out benchmark compares against: the broadcast of the blog
post this project started from, written literally.

What the post describes (three Lambdas, one per route, merged here into one
dispatcher so the local stack can host it with
`--handler loadtest.seed_handler.lambda_handler`):

- connect: put the connection id into the table under the hard-coded room "1";
- disconnect: delete it;
- message: Query the room's connection ids (one Query call, so one page: no
  pagination), then call postToConnection on an API Gateway Management API
  client for each one but the sender, one after another, forwarding the
  messageBody.

Same table, keys and routes as lambda_function.py, so the two run side by side
on the same stack and table layout. Like the samples that post describes, it
creates the management API client in the handler, encodes the body once per
recipient, and lets any failed post end the broadcast. Its one concession to the
local stack: the endpoint comes from CALLBACK_URL when set (the stack sets it),
because `https://{domainName}/{stage}` cannot reach a plain-HTTP emulator.
This is a benchmark baseline, not a handler anyone should deploy.
"""

from __future__ import annotations

import json
import os
from typing import Any

import boto3
from boto3.dynamodb.conditions import Key

ROOM = "ROOM#1"  # every connection joins the one hard-coded room
table = boto3.resource("dynamodb").Table(os.environ.get("TABLE_NAME", ""))


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    request = event["requestContext"]
    connection_id = request["connectionId"]
    route = request["routeKey"]
    if route == "$connect":
        table.put_item(Item={"PK": ROOM, "connectionId": connection_id})
    elif route == "$disconnect":
        table.delete_item(Key={"PK": ROOM, "connectionId": connection_id})
    elif route == "message":
        message_body = json.loads(event["body"])["messageBody"]
        connections = table.query(KeyConditionExpression=Key("PK").eq(ROOM))["Items"]
        endpoint = os.environ.get("CALLBACK_URL") or (
            f"https://{request['domainName']}/{request['stage']}"
        )
        api = boto3.client("apigatewaymanagementapi", endpoint_url=endpoint)
        for connection in connections:
            if connection["connectionId"] != connection_id:
                api.post_to_connection(
                    ConnectionId=connection["connectionId"], Data=json.dumps(message_body)
                )
    return {"statusCode": 200}
