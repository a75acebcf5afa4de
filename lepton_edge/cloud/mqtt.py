"""A thin layer over paho-mqtt 2 (MQTT 5) shared by the service and the simulated devices."""

from __future__ import annotations

import threading
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from .errors import CloudConfigError

__all__ = ["BrokerAddress", "parse_broker_url", "new_client", "connect_and_wait", "session_expiry"]


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    scheme, sep, rest = str(url).partition("://")
    if not sep or scheme not in ("mqtt", "mqtts"):
        raise CloudConfigError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://host:port")
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CloudConfigError(f"broker URL {url!r} needs a host and a port, e.g. mqtt://127.0.0.1:1883")
    return BrokerAddress(host.strip("[]"), int(port), scheme == "mqtts")


def new_client(client_id: str, username: str | None = None, password: str | None = None, *, tls: bool = False,
               ca_file: str | Path | None = None, cert_file: str | Path | None = None,
               key_file: str | Path | None = None) -> paho.Client:
    """A paho MQTT 5 client; with ``tls`` it verifies the broker against ``ca_file`` (else the system CAs)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    if username is not None:
        client.username_pw_set(username, password)
    if tls:
        import ssl

        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        if cert_file:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        client.tls_set_context(context)
    client.reconnect_delay_set(min_delay=0.1, max_delay=5)
    # Publishing from several threads while offline must queue rather than fail.
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(200)
    return client


def session_expiry(seconds: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = seconds
    return props


def connect_and_wait(client: paho.Client, address: BrokerAddress, *, timeout: float = 10.0, clean_start: bool = True,
                     properties: Properties | None = None, keepalive: int = 30) -> None:
    """Connect, start the network loop and wait for the CONNACK; raise on refusal or timeout."""
    done = threading.Event()
    result: dict[str, Any] = {}
    previous = client.on_connect

    def on_connect(c: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        result["reason"] = reason
        done.set()
        if previous is not None:
            previous(c, userdata, flags, reason, props)

    client.on_connect = on_connect
    try:
        try:
            # A synchronous first connect fails at once on a refused or unresolvable address;
            # later reconnects are the network loop's business.
            client.connect(address.host, address.port, keepalive=keepalive, clean_start=clean_start, properties=properties)
        except OSError as e:
            raise ConnectionError(f"cannot reach {address.url}: {e.strerror or e}") from None
        client.loop_start()
        if not done.wait(timeout):
            client.loop_stop()
            raise ConnectionError(f"no CONNACK from {address.url} within {timeout:.0f}s")
    finally:
        client.on_connect = previous
    reason = result["reason"]
    if reason.is_failure:
        client.loop_stop()
        raise ConnectionError(f"broker {address.url} refused the connection: {reason}")
