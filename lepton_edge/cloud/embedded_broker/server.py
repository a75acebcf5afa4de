"""The broker process: listeners, signals, the stats file, and the command line.

``SIGHUP`` re-reads the password, ACL and client-id files (all or none) and disconnects
clients whose credentials no longer pass; ``SIGTERM``/``SIGINT`` stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from .broker import Broker
from .config import BrokerConfig, load_config
from .connection import Connection
from .errors import BrokerConfigError
from .limits import write_stats_file
from .tls import server_context
from .wire import ReasonCode

__all__ = ["serve", "main"]

log = logging.getLogger("lepton_edge.embedded_broker")


def _write_stats(broker: Broker) -> None:
    path = broker.config.stats_file
    if path is None:
        return
    try:
        write_stats_file(path, broker.snapshot())
    except OSError as e:
        log.warning("Cannot write the stats file %s: %s", path, e.strerror or e)


async def _stats_loop(broker: Broker) -> None:
    while True:
        _write_stats(broker)
        await asyncio.sleep(max(0.1, broker.config.stats_interval))


def _contexts(cfg: BrokerConfig) -> list:
    return [server_context(listener) if listener.tls else None for listener in cfg.listeners]


async def serve(cfg: BrokerConfig) -> int:
    loop = asyncio.get_running_loop()
    try:
        broker = Broker(cfg)
        contexts = _contexts(cfg)
    except BrokerConfigError as e:
        log.error("Error: %s", e)
        return 2

    def reload_tls() -> None:
        # New connections get the re-read certificates and CRLs; a file that fails keeps all the old ones.
        try:
            contexts[:] = _contexts(cfg)
        except BrokerConfigError as e:
            log.error("Error: reload of the TLS files failed, keeping the previous ones: %s", e)

    broker.reload_hooks.append(reload_tls)
    servers = []
    for index, listener in enumerate(cfg.listeners):
        try:
            servers.append(await loop.create_server(
                lambda listener=listener, index=index: Connection(broker, listener, contexts[index]),
                listener.host, listener.port, reuse_address=True, backlog=1024))
        except OSError as e:
            log.error("Error: cannot listen on %s:%d: %s", listener.host, listener.port, e.strerror or e)
            return 1
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, broker.reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stats_task = loop.create_task(_stats_loop(broker)) if cfg.stats_file else None
    for listener in cfg.listeners:
        log.info("Opening ipv4 listen socket on port %d%s.", listener.port, " (TLS)" if listener.tls else "")
    log.info("lepton-edge embedded MQTT 5 broker running")
    await stop.wait()
    log.info("Shutting down: %s", broker.stats.summary())
    if stats_task is not None:
        stats_task.cancel()
    _write_stats(broker)
    for server in servers:
        server.close()
    for conn in list(broker.connections):
        conn.close(ReasonCode.SERVER_SHUTTING_DOWN, "server shutting down")
    await asyncio.sleep(0.05)
    return 0


def _raise_fd_limit(connections: int) -> None:
    """Up to the hard limit: one descriptor per connection, plus headroom (a default soft 1024 caps a fleet at ~1000)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256 if hard == resource.RLIM_INFINITY else min(hard, connections + 256)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            log.warning("could not raise the open-file limit from %d to %d", soft, want)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lepton_edge.cloud.embedded_broker",
                                     description="lepton-edge's embedded MQTT 5 broker")
    parser.add_argument("-c", "--config", type=Path, help="config file in Mosquitto syntax (see the package docstring)")
    parser.add_argument("-p", "--port", type=int, help="the first listener's port (overrides the config)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config) if args.config else BrokerConfig()
        if args.port:
            cfg.port = args.port
        for path in (cfg.password_file, cfg.acl_file, cfg.clientid_file):
            if path is not None and not path.is_file():
                raise BrokerConfigError(f"{path} does not exist")
    except BrokerConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    handler: logging.Handler = logging.FileHandler(cfg.log_file) if cfg.log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(created)d: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    _raise_fd_limit(cfg.max_connections)
    try:
        return asyncio.run(serve(cfg))
    except (OSError, ValueError) as e:
        log.error("Error: %s", e)
        return 1
