"""A small MQTT 5 broker in pure Python (asyncio and ``ssl``, stdlib only), the fallback when no ``mosquitto`` exists.

It speaks what lepton-edge's clients use (paho-mqtt 2.x, MQTT 5; MQTT 3.1.1 CONNECTs are
accepted too): QoS 0/1/2, retained messages, Last Will (with delay), ``+``/``#`` wildcards
(``$``-topics are not matched by a leading wildcard), subscription options, subscription
identifiers, shared subscriptions (``$share/<group>/<filter>``, round-robin among members
that may read the topic, no retained messages), persistent sessions (``clean_start=False`` +
Session Expiry Interval), keepalive (1.5x), TLS listeners (``certfile``/``keyfile``, client
certificates through ``cafile``, ``use_identity_as_username``), and Mosquitto's
``password_file`` (``$7$`` PBKDF2-SHA512) and ``acl_file`` (``user`` / ``topic`` / ``pattern``
with ``%u``/``%c``). Not supported, and advertised as such in CONNACK: topic aliases (Topic
Alias Maximum 0), enhanced authentication (AUTH), websockets, bridges, persistence to disk.

Run it as its own process (its own GIL), with a config file in Mosquitto's syntax::

    python -m lepton_edge.cloud.embedded_broker -c broker.conf

Every key and limit is a field of :class:`BrokerConfig` (:mod:`.config`). What one enrolled
device cannot do here, whatever it sends:

- read what its ACL does not grant: SUBSCRIBE is checked per filter (0x87 / 0x80 for a
  filter, ``#`` and ``$SYS/#`` included, that it may not read in full), shared groups give a
  message only to members that may read it, and every delivery is checked again;
- take another client's session: a session belongs to the username that created it, and
  ``clientid_file`` / ``use_username_as_clientid`` tie client ids to users (0x85);
- lock others out: sockets before CONNECT have their own pool (oldest evicted), a 16 KiB
  buffer and a deadline; each user has caps on connections, sessions and publish rate
  (over the rate it is read more slowly); queues are bounded per session and in total;
- crash the broker: a protocol error disconnects that one client with its reason code.

Drops and refusals are counted and written to ``stats_file`` for the cloud's metrics.
``SIGHUP`` re-reads the auth files (all or none) and disconnects clients that no longer
pass; ``SIGTERM`` stops it.

Modules: :mod:`.wire` (packet types, reason codes, property ids), :mod:`.codec` (primitive
encodings), :mod:`.packets` (one codec per packet type), :mod:`.topics`, :mod:`.auth`,
:mod:`.config`, :mod:`.sessions`, :mod:`.routing`, :mod:`.limits`, :mod:`.broker` (shared
state), :mod:`.handlers` + :mod:`.connection` (one client), :mod:`.tls`, :mod:`.server`.
It must never import anything outside the standard library (checked by a test).
:class:`lepton_edge.cloud.broker.ManagedEmbeddedBroker` starts it as a child process behind
the same interface as ``ManagedMosquitto``.
"""

from .broker import Broker
from .config import BrokerConfig, ListenerConfig, load_config
from .errors import BrokerConfigError, EmbeddedBrokerError, ProtocolViolation
from .server import main, serve

__all__ = ["Broker", "BrokerConfig", "ListenerConfig", "load_config", "main", "serve", "EmbeddedBrokerError",
           "BrokerConfigError", "ProtocolViolation"]
