"""Where samples come from: LSL (live), files (offline), the replayer, readers and the simulator."""

from acquisition.chunk import FAULT_KINDS, Chunk, HealthEvent, HealthKind

__all__ = ["FAULT_KINDS", "Chunk", "HealthEvent", "HealthKind"]
