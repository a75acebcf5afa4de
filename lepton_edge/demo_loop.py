"""The demo's closing-the-loop act (see :mod:`lepton_edge.demo`): a wrong release stopped in shadow, and drift.

* v4 is v2 with its class outputs rotated by one (:func:`permuted`): every answer wrong,
  at v2's speed, and its own golden vectors pass, so no latency, error-rate or self-test
  gate can see it. It is deployed to the whole fleet with ``--shadow``: the first wave's
  devices load it beside v2 and run a sample of live requests on it, off the request
  path; the cloud compares its top-1 answers with v2's and rolls the deployment back.
  Each agent's ``/metrics`` then proves it never answered a request
  (``lepton_inference_requests_total`` of v4 is 0, ``lepton_shadow_requests_total`` is not).
* One device gets a shifted input stream (an exposure change: darker strokes on a grey
  background) while the others keep theirs. Its agent measures its live inputs against
  the calibration statistics in the bundle and reports the PSI each interval; the cloud
  POSTs a drift alert to the demo's webhook receiver (:class:`AlertReceiver`, a real
  local HTTP server) once the PSI stays above the threshold for K intervals.

Public API: :func:`permuted`, :func:`shift_inputs`, :class:`AlertReceiver`, :func:`agent_counters`,
:func:`shadow_and_drift`.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from typing import Any, Callable

from .cloud.loop_view import drift_text, shadow_text

__all__ = ["permuted", "shift_inputs", "AlertReceiver", "agent_counters", "shadow_and_drift",
           "SHADOW_POLICY", "DRIFT_PSI", "DRIFT_INTERVALS"]

# 50% of 12 requests/s per device: the 30 comparisons take ~5 s. A release that disagrees on
# every answer is far past a 2% budget after 30; a real fleet would sample 10% and want 200.
SHADOW_POLICY = {"shadow": "50%", "shadow_min": 30, "max_disagreement": "2%"}
DRIFT_PSI = 0.25  # the usual "shifted" reading of the PSI
DRIFT_INTERVALS = 3  # telemetry intervals in a row above it before the alert


def permuted(net: Any, classes: int = 10, shift: int = 1) -> Any:
    """``net`` with its class outputs rotated by ``shift``: the same work, every top-1 answer wrong."""
    import torch
    import torch.nn as nn

    class Permuted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("perm", torch.roll(torch.arange(classes), -shift))

        def forward(self, x: Any) -> Any:
            return self.net(x).index_select(1, self.perm)

    return Permuted()


def shift_inputs(x: Any) -> Any:
    """An exposure change: darker strokes on a grey background (the digits are scaled to [0, 1])."""
    return x * 0.5 + 0.4


class AlertReceiver:
    """A real local HTTP server that keeps every alert the cloud POSTs to it (``cloud serve --alert-webhook``)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        received, lock = self.bodies, self._lock

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                n = min(int(self.headers.get("Content-Length") or 0), 1 << 20)
                try:
                    body = json.loads(self.rfile.read(n))
                except ValueError:
                    body = None
                if isinstance(body, dict):
                    with lock:
                        received.append(body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="demo-alert-receiver", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/alerts"

    def of(self, kind: str, device_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [b for b in self.bodies if b.get("kind") == kind and (device_id is None or b.get("device_id") == device_id)]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


_COUNTER = re.compile(r'^(lepton_inference_requests_total|lepton_shadow_requests_total|lepton_shadow_disagreements_total)'
                      r'\{model="([^"]*)",version="([^"]*)"\} (\d+)$', re.M)


def agent_counters(port: int, model: str) -> dict[str, dict[str, int]]:
    """From an agent's Prometheus ``/metrics``: counter name -> version -> value, for ``model``."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, dict[str, int]] = {}
    for name, m, version, value in _COUNTER.findall(text):
        if m == model:
            out.setdefault(name, {})[version] = int(value)
    return out


def _wait(pred: Callable[[], Any], budget_s: float, step_s: float = 0.3) -> Any:
    deadline = time.monotonic() + budget_s
    while True:
        got = pred()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(step_s)


def shadow_and_drift(client: Any, agents: list[Any], traffic: Any, receiver: AlertReceiver, *, model: str, version: str,
                     active: str, deploy: Callable[..., str], watch: Callable[..., dict[str, Any]], summary: dict[str, Any],
                     checks: Any, clock: Any) -> None:
    """v4 to the fleet in shadow while one device's inputs shift; check both stories end to end.

    ``deploy(version, selector, waves, soak, **policy)`` and ``watch({label: id}, budget_s)``
    are the demo's own helpers; ``traffic.shift(device_id)`` switches one device's stream.
    """
    drifting = agents[-1]
    traffic.shift(drifting.device_id)
    clock.say(f"{drifting.device_id}: its input stream is now shifted (darker strokes on a grey background); "
              f"the other devices keep theirs")

    label = f"{model}@{version} (class outputs permuted)"
    policy = SHADOW_POLICY
    clock.say(f"{model}@{version} answers every input wrong at {active}'s speed: deploy it to the fleet with "
              f"--shadow {policy['shadow']} --shadow-min {policy['shadow_min']} --max-disagreement {policy['max_disagreement']}")
    dep_id = deploy(version, "fleet:demo", "50%,100%", "3s", **policy)
    d = watch({label: dep_id}, 90.0)[label]
    rows = {r["device_id"]: r for r in d.get("devices", [])}
    shadowed = sorted(k for k, r in rows.items() if r.get("status") == "rolled_back")
    untouched = sorted(k for k, r in rows.items() if r.get("status") == "not_sent")
    shadow_gates = [g for g in d.get("wave_results", []) if g.get("stage") == "shadow"]
    counters = {a.device_id: agent_counters(a.port, model) for a in agents}
    answered_by = {k: c.get("lepton_inference_requests_total", {}).get(version, 0) for k, c in counters.items()}
    compared = {k: c.get("lepton_shadow_requests_total", {}).get(version, 0) for k, c in counters.items()}
    disagreed = {k: c.get("lepton_shadow_disagreements_total", {}).get(version, 0) for k, c in counters.items()}
    served_active = {k: c.get("lepton_inference_requests_total", {}).get(active, 0) for k, c in counters.items()}
    summary["deployments"][version] = {
        "status": d["status"], "reason": d.get("reason"), "shadowed_on": shadowed, "never_sent_to": untouched,
        "shadow_gates": [{k: g.get(k) for k in ("device_id", "wave", "passed", "shadow_compared", "shadow_disagreement")}
                         for g in shadow_gates]}
    summary["shadow_metrics"] = {k: {"answered_by_" + version: answered_by[k], "answered_by_" + active: served_active[k],
                                     "shadow_requests": compared[k], "shadow_disagreements": disagreed[k]} for k in counters}
    for k in shadowed:
        clock.say(f"{k} /metrics: {compared[k]} requests compared in shadow, {disagreed[k]} disagreed; "
                  f"answered by {version}: {answered_by[k]}, by {active}: {served_active[k]}")
    checks.add(f"{model}@{version} stopped in shadow on its first wave",
               d["status"] == "rolled_back" and "disagrees with the active model" in (d.get("reason") or "")
               and bool(shadowed) and bool(untouched),
               f"{d['status']}: {d.get('reason')}; in shadow on {', '.join(shadowed) or 'nobody'}, "
               f"never sent to {', '.join(untouched) or 'nobody'}")
    seen_v4 = sorted(a.device_id for a in agents if version in a.versions_seen)
    checks.add(f"no request was ever answered by {version}",
               all(n == 0 for n in answered_by.values()) and not seen_v4 and all(compared[k] > 0 for k in shadowed)
               and sum(served_active.values()) > 0,
               f"agents' /metrics: lepton_inference_requests_total{{version=\"{version}\"}} = "
               f"{', '.join(f'{k} {n}' for k, n in sorted(answered_by.items()))}; shadow comparisons "
               f"{', '.join(f'{k} {compared[k]}' for k in shadowed)}; the traffic saw {version} on "
               f"{', '.join(seen_v4) or 'no device'}")

    alerts = _wait(lambda: receiver.of("drift", drifting.device_id), 40.0)
    devices = {x["device_id"]: x for x in client.devices()}
    others = [a.device_id for a in agents if a is not drifting]
    false_alarms = [b for k in others for b in receiver.of("drift", k)]
    summary["alerts"] = list(receiver.bodies)
    summary["drift"] = {k: x.get("drift", {}).get(model) for k, x in devices.items()}
    if alerts:
        a = alerts[0]
        clock.say(f"alert received at the webhook: [{a.get('severity')}] {a.get('kind')} on {a.get('device_id')}: {a.get('detail')}")
    for k in [drifting.device_id, *others]:
        clock.say(f"{k}: drift {drift_text(devices.get(k, {}).get('drift'))}; shadow {shadow_text(devices.get(k, {}).get('shadow'))}")
    checks.add(f"drift alert for {drifting.device_id}, whose inputs shifted",
               bool(alerts) and not false_alarms and alerts[0].get("model") == model,
               (f"webhook: {alerts[0].get('detail')}" if alerts else "no drift alert reached the webhook")
               + f"; drift alerts for the other devices: {len(false_alarms)}")
