"""The agent process: the service, its HTTP API and (with a broker) the MQTT side, wired.

Start order: model store → HTTP API → MQTT link, telemetry, OTA → the config's bundles
(so their activation events already have somewhere to go). SIGTERM or SIGINT: stop
accepting requests, let in-flight ones finish (``drain_timeout_s``), stop telemetry and
OTA, flush the outbox to the broker as far as it goes (the rest stays on disk), exit 0.
Under systemd (``Type=notify``) the main loop says READY=1 once serving, WATCHDOG=1 while
its HTTP threads are alive, and STOPPING=1 when the drain begins.

Public API: :class:`AgentDaemon`, :func:`run_agent`.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

from .config import AgentConfig
from .http_api import InferenceServer
from .sdnotify import Notifier
from .service import AgentService

__all__ = ["AgentDaemon", "run_agent", "OUTBOX_NAME"]

log = logging.getLogger("lepton_edge.agent")

OUTBOX_NAME = "outbox.sqlite"


class AgentDaemon:
    """Everything one device runs; ``start`` and ``stop`` are each called once."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.service = AgentService(config, activate_configured=False)
        self.server: InferenceServer | None = InferenceServer(self.service, config.api) if config.api.enabled else None
        self.outbox: Any = None
        self.link: Any = None
        self.telemetry: Any = None
        self.ota: Any = None
        self.benchmarks: Any = None
        self._capture_lock = threading.Lock()

    def start(self) -> "AgentDaemon":
        if self.config.broker:
            # Imported here: a device without a broker never loads paho.
            from .link import MqttLink
            from .ota import OtaHandler
            from .outbox import Outbox
            from .telemetry import TelemetryReporter

            self.outbox = Outbox(self.config.state_dir / OUTBOX_NAME, self.config.queue_max_bytes)
            self.link = MqttLink(self.config, self.outbox, on_command=self._on_command)
            self.ota = OtaHandler(self.service, self.link, self.config)
            from .benchmark import BenchmarkRunner

            self.benchmarks = BenchmarkRunner(self.service, self.link, self.config)
            self.service.add_event_listener(self.link.publish_event)
            self.service.add_state_listener(self.link.publish_state)
            self.link.publish_state(self.service.state_message())
            self.link.start()
            self.telemetry = TelemetryReporter(self.link, self.service.metrics, self.config.telemetry_interval_s,
                                               extras=self.service.loop_reports)
            self.telemetry.start()
        if self.server is not None:
            self.server.start()
            log.info("inference API on %s", self.server.url)
        for result in self.service.activate_configured():
            what = f"{result.model}@{result.version}" if result.model else "refused"
            log.log(logging.INFO if result.ok else logging.ERROR, "startup bundle %s: %s", what, result.reason)
        if self.server is not None and not self.service.models():
            # Not an exit: a device with no model yet is how a fresh one waits for its first OTA.
            log.warning("no model is active: /v2/health/ready answers 503 until a bundle is activated (config models: or OTA)")
        return self

    def healthy(self) -> bool:
        """What a watchdog ping vouches for: the API threads still serve."""
        return self.server is None or self.server.serving

    def _on_command(self, cmd: Any) -> None:
        if getattr(cmd, "type", None) == "capture":
            # Not OTA's business (nothing changes what is served); its own thread, one at a time.
            if not self._capture_lock.acquire(blocking=False):
                return  # an upload is running; the cloud asks again if it needs to

            def run() -> None:
                try:
                    self.service.upload_capture(cmd)
                finally:
                    self._capture_lock.release()

            threading.Thread(target=run, name="capture-upload", daemon=True).start()
        elif getattr(cmd, "type", None) == "benchmark":
            # Not OTA's business either: a candidate measured in its own session, never activated.
            if self.benchmarks is not None:
                self.benchmarks.handle(cmd)
        elif self.ota is not None:
            self.ota.handle(cmd)

    def stop(self) -> None:
        drain_s = self.config.drain_timeout_s
        if self.server is not None:
            if not self.server.drain(drain_s):
                log.warning("%d requests were still running after %.0fs; stopping anyway", self.server.in_flight, drain_s)
        if self.telemetry is not None:
            self.telemetry.stop()
        if self.ota is not None:
            self.ota.close(timeout=min(drain_s, 5.0))
        if self.benchmarks is not None:
            self.benchmarks.close(timeout=min(drain_s, 5.0))
        if self.link is not None:
            self.link.stop(flush_timeout=drain_s)
        if self.outbox is not None:
            self.outbox.close()
        self.service.close()


def run_agent(config: AgentConfig, *, ready_file: Path | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status (0 after a clean drain)."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s; draining", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    notifier = Notifier()
    daemon = AgentDaemon(config)
    try:
        daemon.start()
        if ready_file is not None:
            port = daemon.server.port if daemon.server else 0
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            tmp.write_text(f"{port}\n")
            tmp.replace(ready_file)
        notifier.ready(f"serving {len(daemon.service.models())} models")
        _main_loop(stop, daemon, notifier)
    finally:
        notifier.stopping()
        daemon.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def _main_loop(stop: threading.Event, daemon: AgentDaemon, notifier: Notifier) -> None:
    """Wait for a signal; ping systemd's watchdog at half its period while the daemon is healthy."""
    interval = notifier.watchdog_interval_s
    tick = min(1.0, interval) if interval else 1.0
    said = False
    while not stop.wait(tick):
        if not interval:
            continue
        if daemon.healthy():
            notifier.watchdog()
        elif not said:
            log.error("the inference API threads have stopped; withholding the watchdog ping so systemd restarts the agent")
            said = True
