"""The system's own LSL outlet: the state and features after every chunk.

Recorded into the session XDF beside the raw EEG and the trigger markers, and readable by any LSL
tool (presentation software can draw its own feedback from it).
"""

from __future__ import annotations

import numpy as np
import pylsl

from features.types import Label, State

LABEL_CODES = {label: float(i) for i, label in enumerate(Label)}


class StateOutlet:
    """Irregular-rate float32 stream: score, label code, dwell progress, then each feature and z."""

    def __init__(self, name: str, source_id: str, feature_names: list[str]) -> None:
        self.feature_names = list(feature_names)
        labels = [
            "score",
            "label_code",
            "dwell_progress",
            *self.feature_names,
            *[f"z:{f}" for f in self.feature_names],
        ]
        info = pylsl.StreamInfo(
            name, "State", len(labels), pylsl.IRREGULAR_RATE, pylsl.cf_float32, source_id
        )
        chans = info.desc().append_child("channels")
        for label in labels:
            ch = chans.append_child("channel")
            ch.append_child_value("label", label)
            ch.append_child_value("type", "state")
        codes = info.desc().append_child("label_codes")
        for label, code in LABEL_CODES.items():
            codes.append_child_value(label.value, str(int(code)))
        self.source_id = source_id
        self._outlet = pylsl.StreamOutlet(info)
        self._sample = np.zeros(len(labels), dtype=np.float32)  # preallocated, reused per chunk
        self._n = len(self.feature_names)

    def __call__(self, chunk, state: State) -> None:
        """Pipeline tap: push one sample per chunk, stamped with the deciding sample's time."""
        self.push(state)

    def push(self, state: State) -> None:
        s = self._sample
        s[0] = state.score
        s[1] = LABEL_CODES[state.label]
        s[2] = state.dwell_progress
        feats, z = state.features, state.z
        for i, name in enumerate(self.feature_names):
            s[3 + i] = feats.get(name, np.nan)
            s[3 + self._n + i] = z.get(name, np.nan)
        self._outlet.push_sample(s, state.t_stream)

    def close(self) -> None:
        self._outlet = None
