"""Amazon Bedrock batch inference for the Bedrock provider
(https://docs.aws.amazon.com/bedrock/latest/userguide/batch-inference.html).

The items go up to S3 as one JSONL object (``<prefix>/<tag>/input.jsonl``, one record per item:
``{"recordId": custom_id, "modelInput": <the Converse request a realtime call sends>}``) with a SigV4-signed
``PutObject`` (path-style URL, service ``s3``). The job is made by ``CreateModelInvocationJob``
(``POST /model-invocation-job``, ``modelInvocationType: Converse``) with the kernel's tag as its
``jobName`` and ``clientRequestToken``; job names are unique, so the job is found again with
``ListModelInvocationJobs?nameContains=<tag>``. Bedrock writes ``<output prefix>/<job id>/input.jsonl.out``:
one record per item with its ``modelOutput`` (a Converse response) or its ``error``, parsed and classified
like a realtime call's. A small ``items.json`` beside the input keeps which items asked for structured
output through the forced tool, so their answers are read back as text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import httpx

from kernel.batch import BatchCounts, BatchItem, BatchItemResult, BatchJob, BatchLimits, BatchState
from kernel.errors import MalformedResponse, MissingCredentials, ProviderError, error_from_status
from providers._batch import reading_batch_job
from providers._http import WireShapeError, as_list, as_object
from providers._sigv4 import sign

if TYPE_CHECKING:
    from providers.bedrock import BedrockProvider

__all__ = [
    "BUCKET_ENV",
    "CONTROL_URL_ENV",
    "LIMITS",
    "MIN_RECORDS",
    "MIN_RECORDS_ENV",
    "PREFIX_ENV",
    "ROLE_ARN_ENV",
    "S3_ENDPOINT_ENV",
    "BatchSettings",
    "batch_cancel",
    "batch_create",
    "batch_find",
    "batch_results",
    "batch_status",
    "create_payload",
    "missing_message",
    "missing_settings",
    "record",
    "settings_of",
]

LIMITS = BatchLimits(max_requests=50_000, max_bytes=200 * 1024 * 1024)
"""Bedrock's default quotas (https://docs.aws.amazon.com/bedrock/latest/userguide/quotas.html): 50,000
records per job and 1 GB per input file; 200 MB is this provider's bound (the input is built in memory)."""
MIN_RECORDS = 100
"""Bedrock's default minimum of records per batch inference job (a per-model service quota)."""
BUCKET_ENV = "KERNELFLOW_BEDROCK_BATCH_BUCKET"
PREFIX_ENV = "KERNELFLOW_BEDROCK_BATCH_PREFIX"
ROLE_ARN_ENV = "KERNELFLOW_BEDROCK_BATCH_ROLE_ARN"
S3_ENDPOINT_ENV = "KERNELFLOW_BEDROCK_S3_ENDPOINT"
CONTROL_URL_ENV = "KERNELFLOW_BEDROCK_CONTROL_URL"
MIN_RECORDS_ENV = "KERNELFLOW_BEDROCK_BATCH_MIN_RECORDS"
_FIND_PAGES = 10
_STATES: dict[str, BatchState] = {
    "Submitted": "in_progress",
    "Validating": "in_progress",
    "Scheduled": "in_progress",
    "InProgress": "in_progress",
    "Completed": "completed",
    "PartiallyCompleted": "completed",
    "Failed": "failed",
    "Stopping": "cancelling",
    "Stopped": "cancelled",
    "Expired": "expired",
}
_INPUT = "input.jsonl"
_ITEMS = "items.json"


@dataclass(frozen=True, slots=True)
class BatchSettings:
    bucket: str
    prefix: str
    role_arn: str
    s3_endpoint: str
    control_url: str
    min_records: int


def _setting(provider: BedrockProvider, option: str, env: str) -> str:
    value = provider.settings.options.get(option) or provider._environ.get(env)
    return str(value).strip() if value else ""


def missing_settings(provider: BedrockProvider) -> list[tuple[str, str]]:
    """The settings batch inference needs that are not set, as (environment variable, option name)."""
    needed = (("batch_bucket", BUCKET_ENV), ("batch_role_arn", ROLE_ARN_ENV))
    return [(env, option) for option, env in needed if not _setting(provider, option, env)]


def missing_message(missing: list[tuple[str, str]]) -> str:
    """What to set, for a refusal: the environment variables, or the options of the provider's settings."""
    envs = " and ".join(env for env, _ in missing)
    options = " and ".join(option for _, option in missing)
    return (
        f"set {envs} (or the bedrock provider's options {options} in KERNELFLOW_CONFIG) where the workers "
        "run and where pipelines are checked before they start"
    )


def settings_of(provider: BedrockProvider) -> BatchSettings:
    """The batch settings, or ``MissingCredentials`` naming what to set."""
    missing = missing_settings(provider)
    if missing:
        raise MissingCredentials(
            f"provider {provider.name!r} needs for batch inference: {missing_message(missing)}",
            provider=provider.name,
            env_var=missing[0][0],
        )
    region = provider.region
    control = _setting(provider, "control_url", CONTROL_URL_ENV)
    if not control:
        # An overridden runtime endpoint (the simulator, a proxy) serves the control plane too.
        overridden = provider.settings.base_url or provider._environ.get("BEDROCK_ENDPOINT_URL")
        control = provider.base_url if overridden else f"https://bedrock.{region}.amazonaws.com"
    minimum = _setting(provider, "batch_min_records", MIN_RECORDS_ENV)
    return BatchSettings(
        bucket=_setting(provider, "batch_bucket", BUCKET_ENV),
        prefix=_setting(provider, "batch_prefix", PREFIX_ENV).strip("/") or "kernelflow-batch",
        role_arn=_setting(provider, "batch_role_arn", ROLE_ARN_ENV),
        s3_endpoint=(
            _setting(provider, "s3_endpoint", S3_ENDPOINT_ENV) or f"https://s3.{region}.amazonaws.com"
        ).rstrip("/"),
        control_url=control.rstrip("/"),
        min_records=int(minimum) if minimum else MIN_RECORDS,
    )


def record(provider: BedrockProvider, item: BatchItem) -> dict[str, Any]:
    return {"recordId": item.custom_id, "modelInput": provider._map_request(item.request)}


# --- signed HTTP ---------------------------------------------------------------------------------


async def _aws(
    provider: BedrockProvider,
    method: str,
    url: str,
    *,
    service: str,
    body: bytes = b"",
    content_type: str | None = None,
    missing_ok: bool = False,
) -> httpx.Response | None:
    headers = {"accept": "application/json"}
    if content_type:
        headers["content-type"] = content_type
    headers.update(
        sign(
            method,
            url,
            headers,
            body,
            credentials=provider.credentials(),
            region=provider.region,
            service=service,
        )
    )
    request = provider.client.build_request(method, url, content=body or None, headers=headers)
    if missing_ok:
        try:
            response = await provider.client.send(request)
        except httpx.HTTPError as exc:
            raise provider._transport_error(exc, None) from exc
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise provider._status_error(response, response.text, None)
        return response
    return await provider._send(request, model=None)


def _object_url(settings: BatchSettings, key: str) -> str:
    return f"{settings.s3_endpoint}/{quote(settings.bucket, safe='')}/{quote(key, safe='/-_.~')}"


def _split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


async def _control(
    provider: BedrockProvider, method: str, path: str, payload: Mapping[str, Any] | None = None
) -> Any:
    settings = settings_of(provider)
    body = json.dumps(payload, separators=(",", ":")).encode() if payload is not None else b""
    response = await _aws(
        provider,
        method,
        f"{settings.control_url}{path}",
        service="bedrock",
        body=body,
        content_type="application/json" if payload is not None else None,
    )
    assert response is not None
    return provider._json_body(response, None) if response.content else {}


# --- the calls -----------------------------------------------------------------------------------


def _job(provider: BedrockProvider, data: Any) -> BatchJob:
    with reading_batch_job(provider.name):
        body = as_object(data, "the model invocation job")
        status = str(body["status"])
        arn = str(body["jobArn"])
        return BatchJob(
            id=arn.rsplit("/", 1)[-1],
            provider=provider.name,
            tag=str(body.get("jobName") or ""),
            state=_STATES[status],
            vendor_state=status,
            counts=BatchCounts(
                total=int(body.get("totalRecordCount") or 0),
                completed=int(body.get("successRecordCount") or 0),
                failed=int(body.get("errorRecordCount") or 0),
            ),
        )


async def batch_find(provider: BedrockProvider, tag: str) -> BatchJob | None:
    token = ""
    for _ in range(_FIND_PAGES):
        query = {"nameContains": tag, "maxResults": "100", **({"nextToken": token} if token else {})}
        page = as_object(
            await _control(provider, "GET", f"/model-invocation-jobs?{urlencode(query)}"), "list"
        )
        for raw in as_list(page.get("invocationJobSummaries"), "invocationJobSummaries", optional=True):
            if as_object(raw, "a job summary").get("jobName") == tag:
                return _job(provider, raw)
        token = str(page.get("nextToken") or "")
        if not token:
            return None
    return None


def create_payload(
    provider: BedrockProvider, tag: str, model: str, settings: BatchSettings
) -> dict[str, Any]:
    base = f"s3://{settings.bucket}/{settings.prefix}/{tag}"
    return {
        "jobName": tag,
        "clientRequestToken": tag,
        "roleArn": settings.role_arn,
        "modelId": model,
        "modelInvocationType": "Converse",
        "inputDataConfig": {"s3InputDataConfig": {"s3Uri": f"{base}/{_INPUT}", "s3InputFormat": "JSONL"}},
        "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": f"{base}/output/"}},
    }


async def batch_create(provider: BedrockProvider, tag: str, items: list[BatchItem]) -> BatchJob:
    settings = settings_of(provider)
    model = items[0].request.model
    content = "".join(json.dumps(record(provider, i), separators=(",", ":")) + "\n" for i in items)
    tools = {i.custom_id: tool for i in items if (tool := provider._output_tool(i.request)) is not None}
    base = f"{settings.prefix}/{tag}"
    await _aws(
        provider,
        "PUT",
        _object_url(settings, f"{base}/{_ITEMS}"),
        service="s3",
        body=json.dumps({"output_tools": tools}).encode(),
        content_type="application/json",
    )
    await _aws(
        provider,
        "PUT",
        _object_url(settings, f"{base}/{_INPUT}"),
        service="s3",
        body=content.encode(),
        content_type="application/jsonl",
    )
    created = as_object(
        await _control(
            provider, "POST", "/model-invocation-job", create_payload(provider, tag, model, settings)
        ),
        "the created job",
    )
    arn = str(created.get("jobArn") or "")
    if not arn:
        raise MalformedResponse(f"{provider.name} made a batch job without a jobArn", provider=provider.name)
    return await batch_status(provider, arn.rsplit("/", 1)[-1])


async def batch_status(provider: BedrockProvider, batch_id: str) -> BatchJob:
    return _job(
        provider, await _control(provider, "GET", f"/model-invocation-job/{quote(batch_id, safe='')}")
    )


async def batch_cancel(provider: BedrockProvider, batch_id: str) -> BatchJob:
    await _control(provider, "POST", f"/model-invocation-job/{quote(batch_id, safe='')}/stop", {})
    return await batch_status(provider, batch_id)


async def _read(provider: BedrockProvider, settings: BatchSettings, bucket: str, key: str) -> str | None:
    url = f"{settings.s3_endpoint}/{quote(bucket, safe='')}/{quote(key, safe='/-_.~')}"
    response = await _aws(provider, "GET", url, service="s3", missing_ok=True)
    return None if response is None else response.text


async def batch_results(
    provider: BedrockProvider, batch_id: str, custom_ids: list[str], model: str
) -> list[BatchItemResult]:
    settings = settings_of(provider)
    raw = as_object(
        await _control(provider, "GET", f"/model-invocation-job/{quote(batch_id, safe='')}"), "the job"
    )
    job = _job(provider, raw)
    try:
        input_uri = str(raw["inputDataConfig"]["s3InputDataConfig"]["s3Uri"])
        output_uri = str(raw["outputDataConfig"]["s3OutputDataConfig"]["s3Uri"])
    except (KeyError, TypeError) as exc:
        raise MalformedResponse(
            f"{provider.name} described a batch job without its S3 locations: {exc}", provider=provider.name
        ) from exc
    in_bucket, in_key = _split_uri(input_uri)
    out_bucket, out_prefix = _split_uri(output_uri)
    out_key = f"{out_prefix.rstrip('/')}/{job.id}/{in_key.rsplit('/', 1)[-1]}.out".lstrip("/")
    items_text = await _read(provider, settings, in_bucket, f"{in_key.rsplit('/', 1)[0]}/{_ITEMS}")
    output_text = await _read(provider, settings, out_bucket, out_key) or ""
    try:
        tools = as_object(json.loads(items_text), "items.json").get("output_tools") if items_text else {}
        records = [
            as_object(json.loads(line), "a record") for line in output_text.splitlines() if line.strip()
        ]
    except (ValueError, WireShapeError) as exc:
        raise MalformedResponse(
            f"{provider.name} batch output is not JSONL records: {exc}", provider=provider.name
        ) from exc
    output_tools: dict[str, Any] = tools if isinstance(tools, dict) else {}
    by_id = {str(r.get("recordId")): r for r in records}
    missing = "cancelled" if job.state in ("cancelled", "cancelling") else "expired"
    results: list[BatchItemResult] = []
    for custom_id in custom_ids:
        entry = by_id.get(custom_id)
        if entry is None:
            results.append(BatchItemResult(custom_id=custom_id, outcome=missing))
            continue
        results.append(_result(provider, custom_id, model, entry, output_tools.get(custom_id)))
    return results


def _result(
    provider: BedrockProvider, custom_id: str, model: str, entry: dict[str, Any], output_tool: Any
) -> BatchItemResult:
    error = entry.get("error")
    if isinstance(error, dict) or "modelOutput" not in entry:
        details = error if isinstance(error, dict) else {}
        if details.get("expired"):
            return BatchItemResult(custom_id=custom_id, outcome="expired")
        message = str(details.get("errorMessage") or "the record failed")
        error_type = message.split(":", 1)[0] if message.split(":", 1)[0].endswith("Exception") else ""
        status = int(details.get("errorCode") or 500)
        failure: ProviderError = (
            provider._aws_error(error_type, message.split(":", 1)[1].strip(), model)
            if error_type
            else error_from_status(status, message, provider=provider.name, model=model)
        )
        return BatchItemResult.failed(custom_id, failure)
    try:
        answer = provider._parse_answer(
            entry["modelOutput"], model, str(output_tool) if output_tool else None, ""
        )
    except ProviderError as exc:
        return BatchItemResult.failed(custom_id, exc)
    return BatchItemResult(custom_id=custom_id, outcome="succeeded", response=answer)
