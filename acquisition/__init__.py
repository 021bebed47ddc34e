"""Where samples come from: LSL (live), files (offline), the replayer, readers and the simulator.

Import from the submodules; this file imports nothing, so that `features` and `triggers` can use
the shared nouns in `acquisition.chunk` (Chunk, HealthEvent) without loading mne or pylsl.

- `acquisition.chunk`: Chunk and HealthEvent, what every source yields (numpy only).
- `acquisition.sources`: the Source contract and `source_from_settings` (LSL, file, BrainFlow).
- `acquisition.lsl_source.LslSource`, `acquisition.file_source.FileSource`: the two main sources.
- `acquisition.readers`: recordings in (FIF, EDF/BDF, BrainVision, XDF, ...) and out.
- `acquisition.replayer` / `replayer_process`: a recording played back as a live LSL stream.
- `acquisition.simulator`: synthetic EEG with annotated target epochs and artifacts.
"""
