"""The cloud sync service: model registry, fleet, staged rollouts gated on device metrics.

``lepton-edge cloud serve`` (:mod:`.service`) runs three things over one database
(:mod:`.db`, SQLite by default, PostgreSQL via ``--db postgresql://...``; alembic
migrations run at start): the HTTP API (:mod:`.api`, OpenAPI at ``/openapi.json``), MQTT
ingestion and command dispatch (:mod:`.ingest`, shared subscriptions), and the rollout
engine (:mod:`.rollout`) that one replica at a time drives under a lease (:mod:`.leader`).

Modules: :mod:`.registry` (verified bundles), :mod:`.artifacts` (local / memory / S3
blob stores), :mod:`.fleet` (enrolment, revocation, broker auth files via
:mod:`.broker_auth`), :mod:`.client` (HTTP client), :mod:`.cli` (``cloud``, ``devices``,
``models``, ``deploy``), :mod:`.simdevice` (light simulated devices for tests and the
fleet benchmark), :mod:`.broker` (a managed Mosquitto, or :mod:`.embedded_broker`, our own MQTT 5 broker),
:mod:`.metrics` (``GET /metrics``, Prometheus text) and :mod:`.ui` (the operators' web page at ``/ui``
and the offline ``/docs``).
"""
