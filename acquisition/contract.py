"""The Source contract: what a session asks of every source (LSL stream, file, file played live,
BrainFlow board, a benchmark's synthetic loop).

A source subclasses `Source` and so inherits the defaults below for what it does not have (a live
stream has no recording behind it, a file has no stream description); the session then reads
every member directly, never by `hasattr`. The life cycle is resolve -> connect -> pull... ->
disconnect: `resolve` learns the layout (names, rate, types) without consuming samples, so the
XDF recorder can subscribe first; `connect` starts delivery; `pull` returns the next `Chunk`
(zero samples when nothing arrived within `timeout_s`) or None when a finite source has ended.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # numpy / mne only for the annotations: this module stays import-light
    import mne

    from acquisition.chunk import Chunk


@runtime_checkable
class Source(Protocol):
    """One stream of multichannel samples as `Chunk`s (volts; LSL-clock or file seconds)."""

    # ---- required: a plain attribute or a property each ---------------------------------------
    ch_names: tuple[str, ...]  # channel names in column order (known after resolve)
    sfreq: float  # nominal sampling rate (Hz)
    connected: bool  # delivering samples (between connect and disconnect)

    # ---- layout extras, with defaults --------------------------------------------------------

    @property
    def ch_types(self) -> tuple[str, ...] | None:
        """mne-style type per channel ('eeg', 'ecg', 'stim', ...); None when the source has none."""
        return None

    @property
    def eeg_mask(self) -> tuple[bool, ...] | None:
        """Per channel, False where the source itself knows the channel is not EEG (a trigger or
        counter channel by its stream type); None when it knows nothing beyond `ch_types`."""
        return None

    @property
    def warnings(self) -> list[str]:
        """What the source's description lacks (labels, units), as sentences for the summary."""
        return []

    @property
    def source_id(self) -> str | None:
        """The stream's LSL source id (None for files)."""
        return None

    @property
    def replay_speed(self) -> float:
        """The speed a replayer declares for its stream (1.0 for an amplifier or a file)."""
        return 1.0

    # ---- an offline recording behind the source (None for live streams) --------------------
    @property
    def recording(self) -> mne.io.BaseRaw | None:
        """The whole recording (offline sessions save it as their EEG record)."""
        return None

    @property
    def duration_s(self) -> float | None:
        """Length of the recording (s); None for live streams."""
        return None

    @property
    def annotations(self) -> mne.Annotations | None:
        """The recording's annotations, onsets in stream time (`t0` + seconds); None live."""
        return None

    @property
    def t0(self) -> float:
        """Time stamp of the recording's first sample (s); 0.0 for live streams."""
        return 0.0

    @property
    def chunk_size(self) -> int | None:
        """Samples per `pull()` when fixed (files): offline sessions then read whole blocks with
        `pull_chunks` and decide on this grid. None: chunks are what the stream delivers."""
        return None

    # ---- life cycle --------------------------------------------------------------------------
    def resolve(self) -> Source:
        """Find the stream and learn its layout without consuming samples (files: nothing to
        find, the layout is known when the source is built)."""
        return self

    def connect(self) -> Source:
        """Start delivering samples (idempotent)."""
        ...

    def pull(self, timeout_s: float = 0.0) -> Chunk | None:
        """The next chunk; zero samples if none within `timeout_s`; None when the source ended."""
        ...

    def pull_chunks(self, k: int, stop_after_s: float | None = None) -> Chunk | None:
        """`k` chunks of `chunk_size` samples as one block (offline reading; needed only when
        `chunk_size` is not None); stops at `stop_after_s` seconds after `t0`."""
        raise NotImplementedError(
            f"{type(self).__name__} has a chunk_size but no pull_chunks (see acquisition.contract)"
        )

    def disconnect(self) -> None:
        """Stop delivering and release the stream (safe to call any number of times)."""
        ...
