"""A Kubeflow Pipelines API server of the few v2beta1 endpoints the SDK's client calls to
create runs, recurring runs and read them back: enough to check what `vidops submit` sends
(the pipeline spec, parameters, service account, token) without a cluster."""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import parse_qs, urlparse

from .local_http import LocalHttpServer, QuietHandler


class KfpApi(LocalHttpServer):
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring: dict[str, dict[str, Any]] = {}
        api = self

        class Handler(QuietHandler):
            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> tuple[str, dict[str, Any]]:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                url = urlparse(self.path)
                api.requests.append({"method": self.command, "path": url.path,
                                     "query": parse_qs(url.query), "body": body,
                                     "authorization": self.headers.get("Authorization")})
                return url.path, body

            def do_GET(self) -> None:
                path, _ = self._record()
                if path == "/apis/v2beta1/healthz":
                    return self._reply(200, {"multi_user": False})
                if path == "/apis/v2beta1/experiments":
                    return self._reply(200, {"experiments": list(api.experiments.values()),
                                             "total_size": len(api.experiments)})
                if path.startswith("/apis/v2beta1/runs/"):
                    run = api.runs.get(path.rsplit("/", 1)[1])
                    return self._reply(200 if run else 404, run or {"error": "not found"})
                return self._reply(404, {"error": f"no {path}"})

            def do_POST(self) -> None:
                path, body = self._record()
                if path == "/apis/v2beta1/experiments":
                    exp = {**body, "experiment_id": str(uuid.uuid4())}
                    api.experiments[exp["experiment_id"]] = exp
                    return self._reply(200, exp)
                if path == "/apis/v2beta1/runs":
                    run = {**body, "run_id": str(uuid.uuid4()), "state": "RUNNING",
                           "created_at": "2026-11-26T00:00:00Z",
                           "run_details": {"task_details": [
                               {"display_name": "ingest", "state": "SUCCEEDED"},
                               {"display_name": "pretrain", "state": "RUNNING"}]}}
                    api.runs[run["run_id"]] = run
                    return self._reply(200, run)
                if path == "/apis/v2beta1/recurringruns":
                    job = {**body, "recurring_run_id": str(uuid.uuid4()), "status": "ENABLED"}
                    api.recurring[job["recurring_run_id"]] = job
                    return self._reply(200, job)
                return self._reply(404, {"error": f"no {path}"})

        super().__init__(Handler)
