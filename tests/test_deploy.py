"""`make package` / `make deploy` / `make destroy`, as far as they run without AWS.

The package step runs for real, awscli and all, against moto's S3 server on
loopback: it is the step that decides what code Lambda will run. (moto's
CloudFormation cannot create WebSocket APIs, so the deploy itself is not run.)
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from local import template

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "deploy-artifacts"
STACK = "broadcast-test"


def make(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # -o: take .venv as it is; a stale stamp must not start a reinstall mid-test.
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-s",
            "-C",
            str(ROOT),
            "-o",
            ".venv/.installed",
            *arguments,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def packaged(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`make package` against moto's S3: the packaged template and the S3 client."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    output = tmp_path_factory.mktemp("package") / "packaged-template.json"
    # awscli's `package` ignores --endpoint-url for its upload; the variable reaches it.
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": s3_endpoint}
    result = make("package", f"BUCKET={BUCKET}", f"STACK={STACK}", f"PACKAGED={output}", env=env)
    assert result.returncode == 0, result.stderr
    return {"template": json.loads(output.read_text()), "s3": s3}


def test_package_points_the_function_code_at_the_uploaded_object(packaged: dict) -> None:
    function = template.only_resource(packaged["template"], "AWS::Lambda::Function")
    code = function["Properties"]["Code"]
    uploaded = packaged["s3"].list_objects_v2(Bucket=BUCKET)["Contents"]
    assert [item["Key"] for item in uploaded] == [code["S3Key"]]
    assert code == {"S3Bucket": BUCKET, "S3Key": code["S3Key"]}
    assert code["S3Key"].startswith(f"{STACK}/")


def test_package_uploads_a_zip_of_lambda_function_py_alone(packaged: dict) -> None:
    function = template.only_resource(packaged["template"], "AWS::Lambda::Function")
    key = function["Properties"]["Code"]["S3Key"]
    body = packaged["s3"].get_object(Bucket=BUCKET, Key=key)["Body"].read()
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.namelist() == ["lambda_function.py"]
        assert archive.read("lambda_function.py") == (ROOT / "lambda_function.py").read_bytes()


def test_package_changes_nothing_but_the_function_code(packaged: dict) -> None:
    original = json.loads((ROOT / "template.json").read_text())
    result = json.loads(json.dumps(packaged["template"]))
    for resources in (original["Resources"], result["Resources"]):
        del resources["BroadcastFunction"]["Properties"]["Code"]
    assert result == original


@pytest.mark.parametrize(
    ("arguments", "usage"),
    [
        (["deploy", "STACK=demo"], "usage: make deploy STACK=name BUCKET=bucket"),
        (["deploy", "BUCKET=demo"], "usage: make deploy STACK=name BUCKET=bucket"),
        (["package"], "usage: make package BUCKET=bucket"),
        (["destroy"], "usage: make destroy STACK=name"),
    ],
)
def test_a_missing_argument_stops_with_one_line_of_usage(arguments: list[str], usage: str) -> None:
    result = make(*arguments)
    assert result.returncode != 0
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert usage in line
