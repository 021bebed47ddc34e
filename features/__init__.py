"""Pure, stateful signal processing: Chunk -> preprocessing -> artifact flags -> band powers ->
baseline z scores -> State. No I/O, no threads, no clocks; the same chunks give the same numbers
whatever their sizes.

- `features.chain.FeatureChain`: the whole chain, one `step(chunk) -> State` per chunk.
- `features.settings`: the pydantic sections `preprocess`, `bandpower`, `artifacts`, `state`.
- `features.bandpower.band_power(data, sfreq, band)`: Welch band power, a pure function.
"""
