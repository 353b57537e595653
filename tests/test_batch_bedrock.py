"""Bedrock batch inference against the simulator's control plane and a real S3 stand-in (moto's server over
HTTP): the input JSONL written to S3 with SigV4, the job made under the tag as its name and found again
by it, status, per-item results in order read back from S3 with failures classified like realtime calls,
stopping, expiry, the request bodies as botocore's model takes them, and the refusals when the settings
batch inference needs are missing or a batch is under Bedrock's minimum."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from kernel.batch import BatchItem, BatchJob, batch_tag
from kernel.contracts import (
    ChatRequest,
    JsonSchemaFormat,
    ResponseFormatJsonSchema,
    UserMessage,
)
from kernel.errors import MissingCredentials, UnsupportedCapability
from kernel.model_checks import batch_mode_problem, batch_providers
from kernel.pipeline import parse_pipeline
from kernel.provider import ProviderSettings
from kernel.registry import Registry
from providers import bedrock_batch
from providers.bedrock import BedrockProvider
from simulator.server import SimulatorServer

pytestmark = pytest.mark.timeout(60)

MODEL = "amazon.nova-lite-v1:0"
ROLE = "arn:aws:iam::123456789012:role/kernelflow-batch"
AWS = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "sim-secret"}


def _items(count: int, prefix: str = "item") -> list[BatchItem]:
    return [
        BatchItem(
            custom_id=f"{prefix}-{i}",
            request=ChatRequest(model=MODEL, messages=[UserMessage(content=f"question {i}")]),
        )
        for i in range(count)
    ]


def _control(sim: SimulatorServer, **control: object) -> None:
    httpx.post(f"{sim.url}/_sim/batches", json=control).raise_for_status()


def _counts(sim: SimulatorServer) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{sim.url}/_sim/batches").json()
    return data


def _options(s3: str, bucket: str, **extra: str) -> dict[str, str]:
    return {
        "region": "us-east-1",
        "batch_bucket": bucket,
        "batch_role_arn": ROLE,
        "s3_endpoint": s3,
        "batch_min_records": "1",
        **extra,
    }


def _s3(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="AKIDTEST",
        aws_secret_access_key="test-secret",
    )


def _read(endpoint: str, bucket: str, key: str) -> str:
    body: bytes = _s3(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
    return body.decode()


@pytest.fixture
def bucket(moto_s3: str) -> str:
    name = f"kf-{uuid.uuid4().hex[:12]}"
    _s3(moto_s3).create_bucket(Bucket=name)
    return name


@pytest.fixture
async def bedrock(sim: SimulatorServer, moto_s3: str, bucket: str) -> AsyncIterator[BedrockProvider]:
    provider = BedrockProvider(
        settings=ProviderSettings(base_url=sim.url, options=_options(moto_s3, bucket)), environ=AWS
    )
    try:
        yield provider
    finally:
        await provider.aclose()


async def _until_ended(provider: BedrockProvider, batch_id: str) -> BatchJob:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        job = await provider.batch_status(batch_id)
        if job.ended:
            return job
        assert asyncio.get_running_loop().time() < deadline, f"the job never ended; last seen {job}"
        await asyncio.sleep(0.05)


async def test_a_job_answers_every_item_in_order_through_s3(
    sim: SimulatorServer, bedrock: BedrockProvider, moto_s3: str, bucket: str
) -> None:
    items = _items(5)
    tag = batch_tag("wf-b1", "step", "0")
    job = await bedrock.batch_submit(tag, items)
    assert job.provider == "bedrock" and job.tag == tag and re.fullmatch(r"[a-z0-9]{12}", job.id)
    # The input went to S3 as Bedrock reads it: one record per item, the Converse body as modelInput.
    stored = _read(moto_s3, bucket, f"kernelflow-batch/{tag}/input.jsonl")
    records = [json.loads(line) for line in stored.splitlines()]
    assert [r["recordId"] for r in records] == [i.custom_id for i in items]
    assert records[2]["modelInput"] == bedrock._map_request(items[2].request)

    ended = await _until_ended(bedrock, job.id)
    assert (ended.state, ended.vendor_state) == ("completed", "Completed")
    assert ended.counts.total == 5 and ended.counts.completed == 5
    output = _read(moto_s3, bucket, f"kernelflow-batch/{tag}/output/{job.id}/input.jsonl.out")
    assert [json.loads(line)["recordId"] for line in output.splitlines()] == [i.custom_id for i in items]
    results = await bedrock.batch_results(job.id, [i.custom_id for i in reversed(items)], MODEL)
    assert [r.custom_id for r in results] == [i.custom_id for i in reversed(items)]
    for result, index in zip(results, range(4, -1, -1), strict=True):
        assert result.outcome == "succeeded" and result.response is not None
        assert f"question {index}" in (result.response.text or "")
        assert result.response.usage.prompt_tokens > 0
    assert _counts(sim)["by_wire"] == {"bedrock": 1}


async def test_submitting_again_under_the_same_tag_finds_the_job(
    sim: SimulatorServer, bedrock: BedrockProvider, moto_s3: str, bucket: str
) -> None:
    _control(sim, complete_after_s=30)
    items = _items(3)
    tag = batch_tag("wf-b2", "summaries", "0")
    first = await bedrock.batch_submit(tag, items)
    # Another worker that knows only the tag, as after a crash right after Bedrock accepted the job.
    other = BedrockProvider(
        settings=ProviderSettings(base_url=sim.url, options=_options(moto_s3, bucket)), environ=AWS
    )
    try:
        found = await other.batch_find(tag)
        again = await other.batch_submit(tag, items)
    finally:
        await other.aclose()
    assert found is not None and found.id == first.id and found.state == "in_progress"
    assert again.id == first.id
    assert await bedrock.batch_find(batch_tag("wf-b2", "summaries", "1")) is None
    assert _counts(sim)["created"] == 1


async def test_record_failures_are_classified_like_realtime_calls(
    sim: SimulatorServer, bedrock: BedrockProvider
) -> None:
    items = _items(3)
    for index, fault in ((1, "429"), (2, "400")):
        items[index] = BatchItem(
            custom_id=f"item-{index}",
            request=ChatRequest(model=MODEL, messages=[UserMessage(content=f"[[sim: fault={fault}]] hi")]),
        )
    job = await bedrock.batch_submit(batch_tag("wf-b3"), items)
    ended = await _until_ended(bedrock, job.id)
    assert (ended.state, ended.vendor_state) == ("completed", "PartiallyCompleted")
    assert ended.counts.completed == 1 and ended.counts.failed == 2
    results = await bedrock.batch_results(job.id, [i.custom_id for i in items], MODEL)
    assert [r.outcome for r in results] == ["succeeded", "errored", "errored"]
    assert (results[1].error_type, results[1].retryable) == ("RateLimited", True)
    assert (results[2].error_type, results[2].retryable) == ("InvalidRequest", False)


async def test_stopping_a_job_cancels_its_items(sim: SimulatorServer, bedrock: BedrockProvider) -> None:
    _control(sim, complete_after_s=30)
    items = _items(4)
    job = await bedrock.batch_submit(batch_tag("wf-b4"), items)
    stopped = await bedrock.batch_cancel(job.id)
    assert (stopped.state, stopped.vendor_state) == ("cancelled", "Stopped")
    results = await bedrock.batch_results(job.id, [i.custom_id for i in items], MODEL)
    assert {r.outcome for r in results} == {"cancelled"}
    assert _counts(sim)["cancelled"] == 1
    assert sim.stats()["requests"] == 0  # no record ran


async def test_an_expired_job_keeps_the_answers_it_made(
    sim: SimulatorServer, bedrock: BedrockProvider
) -> None:
    _control(sim, expire=True, expire_keep=2)
    items = _items(4)
    job = await bedrock.batch_submit(batch_tag("wf-b5"), items)
    assert (await _until_ended(bedrock, job.id)).vendor_state == "Expired"
    results = await bedrock.batch_results(job.id, [i.custom_id for i in items], MODEL)
    assert [r.outcome for r in results] == ["succeeded", "succeeded", "expired", "expired"]


async def test_structured_output_comes_back_as_text(sim: SimulatorServer, bedrock: BedrockProvider) -> None:
    schema = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
    request = ChatRequest(
        model=MODEL,
        messages=[UserMessage(content="label this")],
        response_format=ResponseFormatJsonSchema(
            json_schema=JsonSchemaFormat(name="label", json_schema=schema)
        ),
    )
    job = await bedrock.batch_submit(batch_tag("wf-b6"), [BatchItem(custom_id="s", request=request)])
    await _until_ended(bedrock, job.id)
    [result] = await bedrock.batch_results(job.id, ["s"], MODEL)
    assert result.response is not None and result.response.choices[0].message.tool_calls is None
    assert isinstance(json.loads(result.response.text or "")["label"], str)


def test_the_create_request_is_what_botocore_sends(bedrock: BedrockProvider) -> None:
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("bedrock")
    operation = model.operation_model("CreateModelInvocationJob")
    assert (operation.http["method"], operation.http["requestUri"]) == ("POST", "/model-invocation-job")
    tag = batch_tag("wf-b7", "step", "0")
    body = bedrock_batch.create_payload(bedrock, tag, MODEL, bedrock_batch.settings_of(bedrock))
    report = ParamValidator().validate(body, operation.input_shape)
    assert not report.has_errors(), report.generate_report()
    # The validator leaves patterns and enums to the server: check them against the model too.
    members = operation.input_shape.members
    for name in ("jobName", "clientRequestToken", "roleArn"):
        assert re.fullmatch(members[name].metadata["pattern"], body[name]), name
    uri_pattern = model.shape_for("S3Uri").metadata["pattern"]
    assert re.fullmatch(uri_pattern, body["inputDataConfig"]["s3InputDataConfig"]["s3Uri"])
    assert re.fullmatch(uri_pattern, body["outputDataConfig"]["s3OutputDataConfig"]["s3Uri"])
    assert body["modelInvocationType"] in members["modelInvocationType"].enum
    from botocore.serialize import create_serializer

    serialized = create_serializer("rest-json").serialize_to_request(body, operation)
    assert json.loads(serialized["body"]) == body
    assert (serialized["method"], serialized["url_path"]) == ("POST", "/model-invocation-job")
    for name in ("GetModelInvocationJob", "StopModelInvocationJob", "ListModelInvocationJobs"):
        assert model.operation_model(name).http["requestUri"].startswith("/model-invocation-job")


async def test_without_bucket_and_role_batches_are_refused_naming_what_to_set(sim: SimulatorServer) -> None:
    provider = BedrockProvider(
        settings=ProviderSettings(base_url=sim.url, options={"region": "us-east-1"}), environ=AWS
    )
    try:
        problem = provider.batch_problem()
        assert problem is not None
        assert bedrock_batch.BUCKET_ENV in problem and bedrock_batch.ROLE_ARN_ENV in problem
        with pytest.raises(UnsupportedCapability, match=bedrock_batch.BUCKET_ENV):
            await provider.batch_submit(batch_tag("x"), _items(1))
        with pytest.raises(MissingCredentials, match=bedrock_batch.ROLE_ARN_ENV):
            bedrock_batch.settings_of(provider)
    finally:
        await provider.aclose()
    assert _counts(sim)["created"] == 0 and sim.stats()["requests"] == 0

    spec = parse_pipeline(
        {
            "name": "b",
            "inputs": {"docs": {"type": "array"}},
            "steps": [
                {
                    "id": "each",
                    "type": "map",
                    "items": "{{ inputs.docs }}",
                    "steps": [
                        {"id": "s", "model": f"bedrock/{MODEL}", "prompt": "x {{ item }}", "mode": "batch"}
                    ],
                }
            ],
        }
    )
    bare = Registry(settings={"bedrock": ProviderSettings(options={"region": "us-east-1"})}, environ=AWS)
    bare.load_entry_points()
    message = batch_mode_problem(spec, bare)
    assert message is not None and "provider 'bedrock' does not take batches" in message
    assert bedrock_batch.BUCKET_ENV in message and "bedrock" not in batch_providers(bare)
    configured = Registry(
        settings={"bedrock": ProviderSettings(options=_options("http://127.0.0.1:1", "b"))}, environ=AWS
    )
    configured.load_entry_points()
    assert batch_mode_problem(spec, configured) is None and "bedrock" in batch_providers(configured)
    env = {**AWS, bedrock_batch.BUCKET_ENV: "b", bedrock_batch.ROLE_ARN_ENV: ROLE, "AWS_REGION": "eu-west-1"}
    from_env = BedrockProvider(environ=env)
    settings = bedrock_batch.settings_of(from_env)
    assert (settings.bucket, settings.role_arn, settings.min_records) == (
        "b",
        ROLE,
        bedrock_batch.MIN_RECORDS,
    )
    assert settings.control_url == "https://bedrock.eu-west-1.amazonaws.com"
    assert settings.s3_endpoint == "https://s3.eu-west-1.amazonaws.com"


def test_s3_requests_are_signed_as_botocore_signs_them() -> None:
    """S3 signs the path as it travels (other services encode it once more): a key with ':' and a space."""
    from datetime import UTC, datetime
    from unittest import mock

    import botocore.auth
    import botocore.awsrequest
    import botocore.credentials

    from providers._sigv4 import AwsCredentials, sign

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    url = "http://127.0.0.1:9000/kf-bucket/my%20prefix/kf-a%3Ab/input.jsonl"
    body = b'{"recordId":"i0","modelInput":{}}\n'
    headers = {"content-type": "application/jsonl", "accept": "application/json"}
    ours = sign(
        "PUT",
        url,
        headers,
        body,
        credentials=AwsCredentials("AKIDEXAMPLE", "secret"),
        region="us-east-1",
        service="s3",
        now=now,
    )
    request = botocore.awsrequest.AWSRequest(
        method="PUT",
        url=url,
        data=body,
        headers={**headers, "X-Amz-Content-SHA256": ours["x-amz-content-sha256"]},
    )
    credentials = botocore.credentials.Credentials("AKIDEXAMPLE", "secret")
    with mock.patch("botocore.auth.get_current_datetime", return_value=now.replace(tzinfo=None)):
        botocore.auth.S3SigV4Auth(credentials, "s3", "us-east-1").add_auth(request)
    assert ours["authorization"] == request.headers["Authorization"]
