"""Where samples come from: LSL (live), files (offline), the replayer, readers and the simulator."""

from acquisition.chunk import FAULT_KINDS, Chunk, HealthEvent, HealthKind

__all__ = ["FAULT_KINDS", "Chunk", "HealthEvent", "HealthKind"]

from acquisition.file_source import FileSource
from acquisition.readers import RecordingError, load_recording, save_recording
from acquisition.simulator import PRESETS, simulate, write_simulated

__all__ += [
    "PRESETS",
    "FileSource",
    "RecordingError",
    "load_recording",
    "save_recording",
    "simulate",
    "write_simulated",
]

# Appended by the LSL part (after the __all__ += above, hence E402).
from acquisition.lsl_source import (  # noqa: E402
    LslSource,
    StreamDescription,
    StreamNotFoundError,
    describe_streams,
    list_streams,
)
from acquisition.sources import FilePlaybackSource, source_from_settings  # noqa: E402

__all__ += [
    "BrainFlowSource",
    "FilePlaybackSource",
    "LslSource",
    "ReplayStats",
    "Replayer",
    "StreamDescription",
    "StreamNotFoundError",
    "describe_streams",
    "list_streams",
    "source_from_settings",
]


def __getattr__(name: str) -> object:
    # Lazy (PEP 562): importing acquisition.replayer here would make
    # `python -m acquisition.replayer` warn that the module was imported before it ran.
    if name in {"Replayer", "ReplayStats"}:
        from acquisition import replayer

        return getattr(replayer, name)
    if name == "BrainFlowSource":  # brainflow loads its native library: only when used
        from acquisition.brainflow_source import BrainFlowSource

        return BrainFlowSource
    raise AttributeError(f"module 'acquisition' has no attribute {name!r}")
