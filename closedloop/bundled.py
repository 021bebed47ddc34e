"""The bundled recording and the demo's settings for it (used by `closedloop demo` and the console).

`replay_data/sim_32ch_500hz.fif` is a 32-channel 500 Hz simulation with annotated meditation
epochs, made by `closedloop simulate` (see replay_data/README.md).
"""

from __future__ import annotations

from pathlib import Path

from closedloop.config import SessionConfig

BUNDLED = Path(__file__).resolve().parents[1] / "replay_data" / "sim_32ch_500hz.fif"
# The bundled recording opens with 65 s of mind wandering (a clean baseline for the tuner's 45 s
# calibration) before its first meditation block. The demo replays it from DEMO_START_S with a
# DEMO_CALIBRATION_S baseline: warm-up 2 s + artifact learning 10 s + settle 1.5 s + 15 s = 28.5 s
# of the 31 s left before the block, so a newcomer sees the first pulse about 33 s in, not 67 s.
DEMO_CALIBRATION_S = 15.0
DEMO_START_S = 34.0


def demo_config(
    config: SessionConfig, name: str, source_id: str, bundled: bool = True
) -> SessionConfig:
    """The demo streams its own replayer: point the source at it; on the bundled recording, a
    shorter baseline (DEMO_CALIBRATION_S) so that a newcomer sees a pulse within about 30 s."""
    config = config.model_copy(deep=True)
    config.source.kind = "lsl"
    config.source.name = name
    config.source.source_id = source_id
    config.session.name = "demo"
    if bundled:
        config.state.calibration_s = min(config.state.calibration_s, DEMO_CALIBRATION_S)
    return config
