"""One way to build a source from a config's `source` section (CLI, console and demo).

`source_from_settings(settings)` reads the section's fields (duck-typed: acquisition/ does not
import closedloop/): `kind: lsl` gives an `LslSource`; `kind: file` gives, live, a
`FilePlaybackSource` (the recording played in real time through the live path: a replayer
thread, an LSL outlet, an `LslSource` with its health checks and clock model) and, offline, a
`FileSource`; `kind: brainflow` a `BrainFlowSource` (the board republished over LSL).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from acquisition.chunk import Chunk
from acquisition.lsl_source import DEFAULT_JITTER_TOLERANCE_S, LslSource

# The replayer starts with the first consumer (the XDF recorder or our inlet), so a recording
# is read from its first sample; this bounds the wait.
PLAYBACK_WAIT_FOR_CONSUMER_S = 60.0


class FilePlaybackSource(LslSource):
    """A recording played in real time over LSL (a stream of its own, unique name) and read
    back by the LslSource it is: `closedloop run` on a file is a live session in every way
    except that the amplifier is the replayer. `pull()` returns None once the whole recording
    has been read (the session then ends with 'end of recording')."""

    def __init__(self, path: str | Path, *, speed: float = 1.0, **lsl_kwargs: Any) -> None:
        from acquisition.readers import load_recording

        self.path = Path(path)
        self._raw = load_recording(self.path)  # errors (missing file, format) before anything
        self._speed = float(speed)
        self.stream_name = f"closedloop-playback-{uuid.uuid4().hex[:8]}"
        lsl_kwargs.pop("name", None)
        lsl_kwargs.pop("source_id", None)
        lsl_kwargs.pop("stype", None)
        super().__init__(name=self.stream_name, source_id=self.stream_name, **lsl_kwargs)
        self._replayer = None
        self._n_total = int(self._raw.n_times)

    def resolve(self) -> FilePlaybackSource:
        if self._replayer is None:
            from acquisition.replayer import Replayer

            self._replayer = Replayer(
                str(self.path),  # (an in-memory Raw from a file has a PosixPath filename)
                name=self.stream_name,
                source_id=self.stream_name,
                speed=self._speed,
                marker_stream=True,
                progress=False,
                wait_for_consumers_s=PLAYBACK_WAIT_FOR_CONSUMER_S,
            ).start()
        super().resolve()
        return self

    def pull(self, timeout_s: float = 0.0) -> Chunk | None:  # type: ignore[override]
        if self.n_received >= self._n_total:
            return None
        return super().pull(timeout_s)

    def disconnect(self) -> None:
        super().disconnect()
        if self._replayer is not None:
            replayer, self._replayer = self._replayer, None
            replayer.stop()

    close = disconnect


def source_from_settings(
    settings: Any,
    *,
    live: bool = True,
    name: str | None = None,
    source_id: str | None = None,
    stype: str | None = None,
    resolve_timeout_s: float | None = None,
) -> Any:
    """The source a `source` config section describes.

    live: False for offline runs (a file is then read as fast as possible by FileSource).
    name / source_id / stype: a stream picked elsewhere (the console's picker, the demo's
    replayer) instead of the section's; picking one makes the source LSL whatever `kind` says.
    resolve_timeout_s: overrides the section's (the demo waits for its replayer to start).
    """
    kind = getattr(settings, "kind", "lsl")
    picked = name is not None or source_id is not None
    if kind == "file" and not picked:
        if settings.path is None:
            raise ValueError("source.path is required when source.kind is 'file'")
        if not live:
            from acquisition.file_source import FileSource

            return FileSource(settings.path, chunk_size=settings.chunk_size)
    timeout = settings.resolve_timeout_s if resolve_timeout_s is None else resolve_timeout_s
    tolerance_ms = getattr(settings, "jitter_tolerance_ms", None)
    kwargs: dict[str, Any] = {
        "resolve_timeout_s": timeout,
        "stale_after_s": settings.stale_after_s,
        "counter_channel": settings.counter_channel,
        "expected_sfreq": settings.expected_sfreq,
        "expected_n_channels": settings.expected_n_channels,
        "jitter_tolerance_s": (
            DEFAULT_JITTER_TOLERANCE_S if tolerance_ms is None else tolerance_ms / 1e3
        ),
    }
    missing_unit = getattr(settings, "missing_unit", None)
    if missing_unit is not None:
        kwargs["missing_unit"] = missing_unit
    if kind == "file" and not picked:
        return FilePlaybackSource(settings.path, **kwargs)
    if kind == "brainflow" and not picked:
        from acquisition.brainflow_source import BrainFlowSource

        return BrainFlowSource(settings.board, dict(settings.board_params), **kwargs)
    return LslSource(
        name=name if picked else settings.name,
        stype=stype if picked else settings.stype,
        source_id=source_id if picked else settings.source_id,
        **kwargs,
    )
