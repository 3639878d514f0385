"""Lambda's Invoke API on the local stack, as the broadcast's hand-offs use it: a
plain boto3 `lambda` client, signed with the credentials the handler has."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.local_harness import wait_for

FUNCTION = "local-BroadcastFunction"


def lambda_client(stack: Any, **credentials: str) -> Any:
    kwargs = {**stack.boto3_kwargs(), **credentials}
    return boto3.client("lambda", endpoint_url=stack.callback_url.rsplit("/", 1)[0], **kwargs)


def test_an_event_invocation_answers_202_at_once_and_runs_the_function(scripted: Any) -> None:
    stack, recording = scripted

    response = lambda_client(stack).invoke(
        FunctionName=f"arn:aws:lambda:us-east-1:123456789012:function:{FUNCTION}",
        InvocationType="Event",
        Payload=json.dumps({"handoff": {"tag": "event-1"}}),
    )

    assert response["StatusCode"] == 202
    entry = wait_for(
        lambda: [e for e in recording.entries() if e["event"].get("handoff") == {"tag": "event-1"}],
        what="the invocation",
    )[0]
    assert entry["context"]["function_name"] == FUNCTION


def test_a_request_response_invocation_answers_what_the_function_returned(scripted: Any) -> None:
    stack, _ = scripted
    response = lambda_client(stack).invoke(FunctionName=FUNCTION, Payload=b'{"n": 1}')
    assert response["StatusCode"] == 200
    assert json.loads(response["Payload"].read()) == {"invoked": {"n": 1}}


def test_another_function_is_not_found(scripted: Any) -> None:
    stack, _ = scripted
    client = lambda_client(stack)
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.invoke(FunctionName="someone-else", InvocationType="Event", Payload=b"{}")


def test_a_payload_that_is_not_json_is_refused(scripted: Any) -> None:
    stack, _ = scripted
    client = lambda_client(stack)
    with pytest.raises(client.exceptions.InvalidRequestContentException):
        client.invoke(FunctionName=FUNCTION, InvocationType="Event", Payload=b"{not json")


def test_a_call_signed_with_other_keys_is_refused(scripted: Any) -> None:
    stack, _ = scripted
    client = lambda_client(stack, aws_access_key_id="testing", aws_secret_access_key="wrong")
    with pytest.raises(ClientError) as refused:
        client.invoke(FunctionName=FUNCTION, InvocationType="Event", Payload=b"{}")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
