"""The agent's GET /metrics read with prometheus_client's own parser, as a Prometheus server reads it."""

from __future__ import annotations

import http.client
import json

from lepton_edge.agent.config import ApiConfig
from lepton_edge.agent.http_api import InferenceServer


def _get(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
    r = c.getresponse()
    data = r.read().decode()
    c.close()
    return r.status, data


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, text = _get(port, "GET", "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_agent_metrics_parse_as_prometheus_text_and_move_with_requests(service, bundles, tmp_path):
    srv = InferenceServer(service, ApiConfig(port=0, max_body_bytes=64 * 1024, unix_socket=tmp_path / "agent.sock")).start()
    try:
        x = bundles.sample(1)
        body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}).encode()
        labels = (("model", "digits"), ("version", "1.0.0"))
        for n, more in ((3, 3), (5, 2)):
            for _ in range(more):
                assert _get(srv.port, "POST", "/v2/models/digits/infer", body)[0] == 200
            s = _scrape(srv.port)
            assert s[("lepton_inference_requests_total", labels)] == n
            assert s[("lepton_inference_errors_total", labels)] == 0
            assert s[("lepton_inference_latency_seconds_count", labels)] == n
            assert s[("lepton_inference_latency_seconds_bucket", tuple(sorted(labels + (("le", "+Inf"),))))] == n
            assert s[("lepton_inference_latency_seconds_sum", labels)] > 0
            buckets = sorted((float(dict(k[1])["le"]), v) for k, v in s.items() if k[0] == "lepton_inference_latency_seconds_bucket")
            assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert _get(srv.port, "POST", "/v2/models/nope/infer", body)[0] == 404
        assert _scrape(srv.port)[("lepton_http_errors_total", (("code", "404"),))] == 1
    finally:
        srv.close()
