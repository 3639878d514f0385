"""Shared fixtures. The environment is set before anything imports boto3 or the
Lambda, so no test can ever reach a real AWS account."""

from __future__ import annotations

import os

os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "TABLE_NAME": "connections-test",
    }
)
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("AWS_ENDPOINT_URL_DYNAMODB", None)

# moto registers its botocore hooks on import: importing it before any client is
# made lets unit tests mock clients created at module level (as Lambda code does).
import moto  # noqa: F401

pytest_plugins = ["tests.lambda_harness", "tests.local_harness"]
