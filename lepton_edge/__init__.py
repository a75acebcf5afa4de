"""lepton-edge: convert models for edge devices, run them, and keep a fleet up to date.

The shared core lives here: device profiles, the bundle contract, signing, the MQTT
protocol, the CLI and the cloud service. ``lepton_edge.converters`` and
``lepton_edge.agent`` are installed from the top-level ``converters/`` and ``agent/``.
"""

__version__ = "0.1.0"
