"""Amazon Bedrock batch inference's control plane
(https://docs.aws.amazon.com/bedrock/latest/APIReference/API_CreateModelInvocationJob.html):
`POST /model-invocation-job`, `GET /model-invocation-jobs`, `GET /model-invocation-job/{jobIdentifier}`,
`POST /model-invocation-job/{jobIdentifier}/stop`, with a job runner over an S3 endpoint.

The input and output live in S3, not here: `POST /_sim/bedrock-batch` `{"s3_endpoint": url}` names the S3
endpoint (path-style; a local stand-in such as moto's server), else the environment variable
`SIM_BEDROCK_S3_ENDPOINT`; the simulator signs its S3 calls with botocore's SigV4 signer (botocore is
needed for these jobs only), as the job's service role would. Creating a job reads its JSONL input (records
`{"recordId", "modelInput"}`, `modelInvocationType: Converse`); when the job ends (`/_sim/batches` controls
when), each record runs through the Bedrock wire's ordinary Converse flow, and the output is written to
`<output s3Uri>/<job id>/<input file name>.out`: each record with its `modelOutput`, or its `error`
(`errorCode`, `errorMessage`). Expired and stopped records are left out. Job names are unique; the same
`clientRequestToken` answers the job it made.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from simulator.app import run_offline
from simulator.batches import SimBatch
from simulator.bedrock_wire import BedrockWire
from simulator.core import Simulator

__all__ = ["ACCOUNT", "routes"]

ACCOUNT = "123456789012"
_REGION = "us-east-1"
_ERROR_TYPES = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    409: "ConflictException",
}


def _error(status: int, message: str) -> Response:
    error_type = _ERROR_TYPES.get(status, "InternalServerException")
    return JSONResponse(
        {"message": message},
        status_code=status,
        headers={"x-amzn-ErrorType": f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/"},
    )


def _time(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _item_request(model: str) -> Request:
    """The request a record would have come in as, for the Bedrock wire's Converse parser."""
    scope = {
        "type": "http",
        "method": "POST",
        "scheme": "http",
        "server": ("simulator", 80),
        "root_path": "",
        "path": f"/model/{model}/converse",
        "path_params": {"model_id": model},
        "headers": [],
        "query_string": b"",
    }
    return Request(scope)


def _signed(method: str, url: str, body: bytes = b"") -> dict[str, str]:
    """The headers botocore's S3 SigV4 signer adds, for the simulator's own placeholder keys."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method=method, url=url, data=body)
    S3SigV4Auth(Credentials("ASIMULATORJOBROLE", "simulator-secret"), "s3", _REGION).add_auth(request)
    return {name: str(value) for name, value in request.headers.items()}


class _Jobs:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.wire = BedrockWire()
        self.s3_endpoint = os.environ.get("SIM_BEDROCK_S3_ENDPOINT", "")
        self._ids: dict[str, str] = {}  # job id -> simulator batch id

    def _s3(self, bucket: str, key: str) -> str:
        return f"{self.s3_endpoint.rstrip('/')}/{bucket}/{key}"

    def _find(self, identifier: str) -> SimBatch | None:
        job_id = identifier.rsplit("/", 1)[-1]
        batch_id = self._ids.get(job_id)
        return None if batch_id is None else self.sim.batches.get(batch_id, "bedrock")

    def _refused(self, request: Request) -> Response | None:
        refused = self.wire.auth_error(request.headers)
        return None if refused is None else JSONResponse(refused.body, status_code=refused.status)

    async def control(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                self.s3_endpoint = str(json.loads(await request.body())["s3_endpoint"])
            except (ValueError, KeyError, TypeError) as exc:
                return JSONResponse({"error": {"message": f"expected {{'s3_endpoint': url}}: {exc}"}}, 400)
        return JSONResponse({"s3_endpoint": self.s3_endpoint})

    async def create(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            payload = json.loads(await request.body())
            job_name = str(payload["jobName"])
            model = str(payload["modelId"])
            role = str(payload["roleArn"])
            input_uri = str(payload["inputDataConfig"]["s3InputDataConfig"]["s3Uri"])
            output_uri = str(payload["outputDataConfig"]["s3OutputDataConfig"]["s3Uri"])
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"Malformed request: missing or invalid {exc}")
        if payload.get("modelInvocationType", "InvokeModel") != "Converse":
            return _error(400, "This simulator runs batch jobs with modelInvocationType Converse only.")
        if not self.s3_endpoint:
            return _error(400, "The simulator has no S3 endpoint (POST /_sim/bedrock-batch).")
        try:
            import botocore.auth  # noqa: F401
        except ImportError:
            return _error(
                500, "The simulator signs its S3 calls with botocore: install it for Bedrock batch jobs."
            )
        async with httpx.AsyncClient(timeout=30) as client:
            url = self._s3(*_split(input_uri))
            got = await client.get(url, headers=_signed("GET", url))
        if got.status_code != 200:
            return _error(400, f"Unable to read the input at {input_uri} (S3 answered {got.status_code}).")
        items: list[tuple[str, Any]] = []
        seen: set[str] = set()
        for number, line in enumerate(got.text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                record_id, model_input = str(entry["recordId"]), entry["modelInput"]
            except (ValueError, KeyError, TypeError):
                return _error(
                    400, f"Line {number} of {input_uri} is not a record with recordId and modelInput."
                )
            if record_id in seen:
                return _error(400, f"Line {number}: recordId {record_id} is repeated.")
            seen.add(record_id)
            items.append((record_id, model_input))
        if not items:
            return _error(400, f"The input at {input_uri} holds no records.")
        # Checked with no await before the job is made: two creates of one name make one job.
        token = str(payload.get("clientRequestToken") or "")
        for existing in self.sim.batches.listing("bedrock"):
            if existing.metadata["jobName"] == job_name:
                if token and existing.metadata.get("token") == token:
                    return JSONResponse({"jobArn": existing.extra["arn"]})
                return _error(409, f"A job with the name {job_name} already exists.")
        batch = self.sim.batches.create(
            "bedrock",
            items,
            {"jobName": job_name, "token": token},
            prefix="",
            extra={"model": model, "role": role, "input": input_uri, "output": output_uri},
        )
        job_id = hashlib.sha256(batch.id.encode()).hexdigest()[:12]
        batch.extra.update(
            job_id=job_id, arn=f"arn:aws:bedrock:{_REGION}:{ACCOUNT}:model-invocation-job/{job_id}"
        )
        self._ids[job_id] = batch.id
        if batch.control.hold_create_s > 0:
            await asyncio.sleep(batch.control.hold_create_s)
        return JSONResponse({"jobArn": batch.extra["arn"]})

    async def _render(self, batch: SimBatch) -> dict[str, Any]:
        model = str(batch.extra["model"])

        def run(body: Any) -> tuple[int, Any]:
            return run_offline(
                self.sim,
                self.wire,
                self.wire.parse_converse,
                self.wire.converse_reply,
                body,
                _item_request(model),
            )

        outcomes = self.sim.batches.settle(batch, run)
        state = batch.state()
        counts = batch.counts()
        if outcomes is not None and not batch.extra.get("written"):
            await self._write(batch)
        if state == "in_progress":
            status = "InProgress"
        elif state == "cancelled":
            status = "Stopped"
        elif state == "expired":
            status = "Expired"
        else:
            status = "PartiallyCompleted" if counts["errored"] else "Completed"
        body: dict[str, Any] = {
            "jobArn": batch.extra["arn"],
            "jobName": batch.metadata["jobName"],
            "modelId": model,
            "roleArn": batch.extra["role"],
            "status": status,
            "submitTime": _time(batch.created_at),
            "lastModifiedTime": _time(batch.ended_at or batch.created_at),
            "inputDataConfig": {
                "s3InputDataConfig": {"s3Uri": batch.extra["input"], "s3InputFormat": "JSONL"}
            },
            "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": batch.extra["output"]}},
            "modelInvocationType": "Converse",
            "timeoutDurationInHours": 24,
        }
        if batch.metadata.get("token"):
            body["clientRequestToken"] = batch.metadata["token"]
        if outcomes is not None:
            body.update(
                endTime=_time(batch.ended_at or batch.created_at),
                totalRecordCount=counts["total"],
                processedRecordCount=counts["succeeded"] + counts["errored"],
                successRecordCount=counts["succeeded"],
                errorRecordCount=counts["errored"],
            )
        return body

    async def _write(self, batch: SimBatch) -> None:
        lines: list[str] = []
        for (record_id, model_input), outcome in zip(batch.items, batch.outcomes or [], strict=True):
            entry: dict[str, Any] = {"recordId": record_id, "modelInput": model_input}
            if outcome.kind == "succeeded":
                entry["modelOutput"] = outcome.body
            elif outcome.kind == "errored":
                message = (outcome.body or {}).get("message") if isinstance(outcome.body, dict) else None
                entry["error"] = {"errorCode": outcome.status, "errorMessage": str(message or "failed")}
            else:
                continue  # expired and stopped records have no output
            lines.append(json.dumps(entry, separators=(",", ":")))
        bucket, prefix = _split(str(batch.extra["output"]))
        _, input_key = _split(str(batch.extra["input"]))
        base = f"{prefix.rstrip('/')}/{batch.extra['job_id']}".lstrip("/")
        counts = batch.counts()
        manifest = {
            "totalRecordCount": counts["total"],
            "processedRecordCount": counts["succeeded"] + counts["errored"],
            "successRecordCount": counts["succeeded"],
            "errorRecordCount": counts["errored"],
        }
        async with httpx.AsyncClient(timeout=30) as client:
            name = input_key.rsplit("/", 1)[-1]
            body = "".join(line + "\n" for line in lines).encode()
            manifest_body = json.dumps(manifest).encode()
            for key, content in ((f"{base}/{name}.out", body), (f"{base}/manifest.json.out", manifest_body)):
                url = self._s3(bucket, key)
                (
                    await client.put(url, content=content, headers=_signed("PUT", url, content))
                ).raise_for_status()
        batch.extra["written"] = True

    async def retrieve(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        batch = self._find(str(request.path_params["job"]))
        if batch is None:
            return _error(404, f"Could not find the batch inference job {request.path_params['job']}.")
        return JSONResponse(await self._render(batch))

    async def stop(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        batch = self._find(str(request.path_params["job"]))
        if batch is None:
            return _error(404, f"Could not find the batch inference job {request.path_params['job']}.")
        if batch.state() != "in_progress":
            return _error(400, "The job cannot be stopped: it has already ended.")
        self.sim.batches.cancel(batch)
        return JSONResponse({})

    async def listing(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        contains = request.query_params.get("nameContains", "")
        size = int(request.query_params.get("maxResults", "100"))
        start = int(request.query_params.get("nextToken") or 0)
        found = [b for b in self.sim.batches.listing("bedrock") if contains in b.metadata["jobName"]]
        page = found[start : start + size]
        body: dict[str, Any] = {"invocationJobSummaries": [await self._render(b) for b in page]}
        if start + size < len(found):
            body["nextToken"] = str(start + size)
        return JSONResponse(body)


def routes(sim: Simulator) -> list[BaseRoute]:
    jobs = _Jobs(sim)
    return [
        Route("/_sim/bedrock-batch", jobs.control, methods=["GET", "POST"]),
        Route("/model-invocation-job", jobs.create, methods=["POST"]),
        Route("/model-invocation-jobs", jobs.listing, methods=["GET"]),
        Route("/model-invocation-job/{job:path}/stop", jobs.stop, methods=["POST"]),
        Route("/model-invocation-job/{job:path}", jobs.retrieve, methods=["GET"]),
    ]
