"""lepton-edge's on-device agent (installed as ``lepton_edge.agent``; never imports torch or onnx).

- :mod:`.config`: the one YAML config (``load_config``).
- :mod:`.service`: ``AgentService``, the active model versions, safe activation and rollback,
  the Python inference API; :mod:`.inference` (a loaded version, input checks, golden replay),
  :mod:`.store` (versioned directories, atomic pointer), :mod:`.watchdog`, :mod:`.metrics`.
- :mod:`.http_api`: the Open Inference Protocol (KServe v2) over HTTP, binary tensors included.
- :mod:`.link`, :mod:`.outbox`, :mod:`.telemetry`, :mod:`.ota`, :mod:`.sysinfo`: MQTT 5
  (lepton/v1), store-and-forward, telemetry and over-the-air updates.
- :mod:`.daemon`: all of it wired as one process; :mod:`.cli`: ``lepton-edge agent``.
"""
