"""The local exchange simulator: recorded frames over real WebSocket/HTTP on 127.0.0.1."""

from ingestd.sim.server import Faults, SimServer

__all__ = ["Faults", "SimServer"]
