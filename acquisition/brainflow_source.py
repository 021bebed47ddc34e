"""BrainFlow boards (OpenBCI Cyton / Ganglion, Muse, Unicorn, ... and the synthetic board) as a
live source, through LSL.

BrainFlow (MIT) reads 60+ boards but has no LSL output of its own. `BrainFlowSource` starts the
board with `BoardShim`, republishes its EEG as an LSL outlet (a bridge thread, every
`BRIDGE_PERIOD_S`), and reads that outlet back as the `LslSource` it is: the same `Chunk`s,
health checks and clock model as any amplifier, and the XDF recording holds the stream like any
other. The extra hop costs ~0.1-0.2 ms (DESIGN: push -> pull median ~0.1 ms).

- Channels: the board description's EEG channels, named from its `eeg_names` (else `EEG1`, ...)
  in microvolts (BrainFlow's EEG unit), plus `package`: the board's package number unwrapped
  (BrainFlow's wraps at 256), a counter that `source.counter_channel: package` checks exactly
  on boards whose package number steps by one per sample (Cyton, the synthetic board).
- Time: BrainFlow stamps samples with the Unix time of their arrival; they are mapped onto the
  LSL clock with the offset `time.time() - local_clock()` measured when the board starts.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from typing import Any

import numpy as np
import pylsl

from acquisition.lsl_source import LslSource, StreamNotFoundError

# How often the bridge moves samples from BrainFlow's ring buffer to the outlet: a Cyton
# delivers every ~16 ms (FTDI), so 4 ms adds at most 4 ms to a sample's way.
BRIDGE_PERIOD_S = 0.004
# BrainFlow's package number wraps at this value.
PACKAGE_MODULUS = 256
PACKAGE_CHANNEL = "package"


def board_id(board: str | int) -> int:
    """BrainFlow board id from a name (`CYTON_BOARD`, `cyton`, `synthetic`) or a number."""
    from brainflow.board_shim import BoardIds

    if isinstance(board, int) or str(board).lstrip("-").isdigit():
        return int(board)
    key = str(board).strip().upper()
    names = {b.name: b.value for b in BoardIds}
    for candidate in (key, f"{key}_BOARD"):
        if candidate in names:
            return names[candidate]
    raise ValueError(f"unknown BrainFlow board {board!r}; e.g. {', '.join(sorted(names)[:8])}, ...")


class BrainFlowSource(LslSource):
    """A BrainFlow board, republished over LSL and read back (see the module docstring).

    board: name or id (`board_id`). params: BrainFlowInputParams fields as BrainFlow takes them
    (serial_port, mac_address, ip_address, ip_port, serial_number, other_info, file, timeout,
    ...). lsl_kwargs: LslSource settings (stale_after_s, counter_channel, jitter tolerance...).
    """

    def __init__(
        self,
        board: str | int,
        params: dict[str, Any] | None = None,
        *,
        stream_name: str | None = None,
        **lsl_kwargs: Any,
    ) -> None:
        from brainflow.board_shim import BoardShim, BrainFlowInputParams

        self.board = board_id(board)
        self.params = dict(params or {})
        inputs = BrainFlowInputParams()
        for key, value in self.params.items():
            if not hasattr(inputs, key):
                raise ValueError(f"BrainFlow has no input parameter {key!r}")
            setattr(inputs, key, value)
        self._inputs = inputs
        descr = BoardShim.get_board_descr(self.board)
        self.board_name = str(descr.get("name", self.board))
        self._eeg_rows = list(BoardShim.get_eeg_channels(self.board))
        names = [n for n in str(descr.get("eeg_names", "")).split(",") if n]
        if len(names) != len(self._eeg_rows):
            names = [f"EEG{k + 1}" for k in range(len(self._eeg_rows))]
        self.eeg_names = tuple(names)
        self._package_row = descr.get("package_num_channel")
        self._ts_row = BoardShim.get_timestamp_channel(self.board)
        self.board_sfreq = float(BoardShim.get_sampling_rate(self.board))
        self.stream_name = stream_name or f"brainflow-{self.board_name}-{uuid.uuid4().hex[:6]}"
        for key in ("name", "source_id", "stype"):
            lsl_kwargs.pop(key, None)
        super().__init__(name=self.stream_name, source_id=self.stream_name, **lsl_kwargs)
        self._shim: Any = None
        self._bridge: threading.Thread | None = None
        self._stop = threading.Event()
        self.bridge_error: BaseException | None = None

    # -------------------------------------------------------------- the bridge
    def _outlet(self) -> pylsl.StreamOutlet:
        n_ch = len(self._eeg_rows) + 1
        info = pylsl.StreamInfo(
            self.stream_name, "EEG", n_ch, self.board_sfreq, pylsl.cf_double64, self.stream_name
        )
        desc = info.desc()
        desc.append_child_value("manufacturer", f"BrainFlow {self.board_name}")
        chans = desc.append_child("channels")
        for label in self.eeg_names:
            ch = chans.append_child("channel")
            ch.append_child_value("label", label)
            ch.append_child_value("unit", "microvolts")
            ch.append_child_value("type", "EEG")
        ch = chans.append_child("channel")
        ch.append_child_value("label", PACKAGE_CHANNEL)
        ch.append_child_value("type", "misc")
        return pylsl.StreamOutlet(info)

    def _start_board(self) -> None:
        from brainflow.board_shim import BoardShim, BrainFlowError

        BoardShim.disable_board_logger()
        shim = BoardShim(self.board, self._inputs)
        try:
            shim.prepare_session()
            shim.start_stream()
        except BrainFlowError as exc:
            raise StreamNotFoundError(
                f"BrainFlow board {self.board_name} (id {self.board}, {self.params}) did not "
                f"start: {exc}"
            ) from exc
        self._shim = shim
        outlet = self._outlet()
        self._stop.clear()
        self._bridge = threading.Thread(
            target=self._run_bridge, args=(outlet,), name=f"brainflow-{self.board}", daemon=True
        )
        self._bridge.start()

    def _run_bridge(self, outlet: pylsl.StreamOutlet) -> None:
        shim = self._shim
        rows = [*self._eeg_rows]
        offset = time.time() - pylsl.local_clock()  # Unix -> LSL clock
        last_pkg = math.nan
        unwrapped = 0.0
        try:
            while not self._stop.wait(BRIDGE_PERIOD_S):
                n = shim.get_board_data_count()
                if n <= 0:
                    continue
                block = shim.get_board_data(n)  # (rows, n), removed from BrainFlow's buffer
                out = np.empty((n, len(rows) + 1))
                out[:, :-1] = block[rows].T
                if self._package_row is not None:
                    pkg = block[self._package_row]
                    steps = np.diff(pkg, prepend=pkg[0] if math.isnan(last_pkg) else last_pkg)
                    steps %= PACKAGE_MODULUS  # 255 -> 0 is a step of 1
                    if math.isnan(last_pkg):
                        steps[0] = 0.0
                    out[:, -1] = unwrapped + np.cumsum(steps)
                    unwrapped = float(out[-1, -1])
                    last_pkg = float(pkg[-1])
                else:
                    out[:, -1] = np.nan
                outlet.push_chunk(out, (block[self._ts_row] - offset).tolist())
        except BaseException as exc:  # loud: the source sees the stream go (LOST), we keep why
            self.bridge_error = exc
        finally:
            del outlet  # consumers see the loss

    def _stop_board(self) -> None:
        self._stop.set()
        if self._bridge is not None:
            self._bridge.join(5.0)
            self._bridge = None
        if self._shim is not None:
            shim, self._shim = self._shim, None
            try:
                shim.stop_stream()
            finally:
                shim.release_session()

    # -------------------------------------------------------------- life cycle
    def resolve(self) -> BrainFlowSource:
        if self._shim is None:
            self._start_board()
        try:
            super().resolve()
        except BaseException:
            self._stop_board()
            raise
        return self

    def disconnect(self) -> None:
        super().disconnect()
        self._stop_board()

    close = disconnect
