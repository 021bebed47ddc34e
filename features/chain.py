"""FeatureChain: Chunk -> preprocess -> artifact flags -> band powers -> baseline z -> State.

Everything runs per sample with state kept between chunks, so any chunking gives the same
numbers and the same label changes at the same samples; one State is returned per chunk (the
state after its last sample). Nothing here does I/O, reads a clock, logs or validates per chunk.

Calibration: the live band-power features (every band@group) of each calibration sample and its
artifact flag go into buffers preallocated for calibration_max_s. When calibration_s of clean
samples (after the estimator settled) are in, the baseline is their median / MAD. With
`individual_alpha` the preprocessed signal is kept too: the alpha peak is found in it, the bands
move, and a fresh estimator re-runs over it and takes over live (one-off cost at the finishing
chunk, ~150 ms for 60 s at 1000 Hz x 6 channels). A separate calibration recording
(`calibrate_on`) is preprocessed and estimated with fresh filter states.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from acquisition.chunk import Chunk
from features import kernels
from features import names as names_mod
from features.artifacts import KINDS, ArtifactDetector
from features.bandpower import (
    IirBandPower,
    group_matrix,
    individual_alpha_peak,
    make_estimator,
    to_output,
)
from features.learn import find_bad_channels, learn_limits
from features.preprocess import Preprocessor, fill_nonfinite
from features.settings import (
    MIN_BASELINE_S,
    ArtifactSettings,
    BandPowerSettings,
    FeatureConfigError,
    PreprocessSettings,
    StateSettings,
    blink_channels,
    check_thresholds,
    validate_feature_settings,
)
from features.state import MAD_TO_SD, LabelMachine, robust_stats
from features.types import Label, State

# Rate (Hz) at which stored calibration features enter the median / MAD.
BASELINE_RATE_HZ = 100.0
_NAN = float("nan")
_LABELS = tuple(Label)  # label codes of kernels.decide
_CODE = {lab: i for i, lab in enumerate(_LABELS)}
# Calibration progress looks at this many recent seconds to say what holds it back.
RECENT_S = 10
# A channel making up less than this share of the score channels' reference carries its flags
# into the score only by sheer size (features/artifacts.py): 1/16 keeps the 8-channel OpenBCI
# file as it was (1/8 each) and lets the blinks of a 64-channel cap (1/62) go on being vetoed
# without stopping the occipital alpha's measurement or the baseline. On the simulated 64-ch
# eyes-open/closed recordings the blinks held 14-49 % of the calibration (9.3-15.6 s for 8 s).
LEAK_HOLD = 1.0 / 16.0


class FeatureChain:
    """Stateful feature chain for one stream (fixed channels and rate).

    ch_names / sfreq: the stream's channels and nominal rate. eeg_mask: which channels are EEG
    (default: all whose names are not in preprocess.exclude, e.g. 'counter').
    Raises FeatureConfigError (every problem with its key path) when settings do not fit.
    """

    def __init__(
        self,
        preprocess: PreprocessSettings,
        bandpower: BandPowerSettings,
        artifacts: ArtifactSettings,
        state: StateSettings,
        ch_names: Sequence[str],
        sfreq: float,
        eeg_mask: Sequence[bool] | None = None,
    ) -> None:
        ch_names = tuple(ch_names)
        sfreq = float(sfreq)
        if eeg_mask is None:
            excl = {e.lower() for e in preprocess.exclude}
            eeg_mask = [c.lower() not in excl for c in ch_names]
        if len(eeg_mask) != len(ch_names):
            raise ValueError(f"eeg_mask has {len(eeg_mask)} entries for {len(ch_names)} channels")
        eeg_idx = np.flatnonzero(np.asarray(eeg_mask, dtype=bool))
        eeg_names = tuple(ch_names[i] for i in eeg_idx)
        if not eeg_names:
            raise FeatureConfigError(["preprocess.exclude: no EEG channel left in the stream"])
        validate_feature_settings(eeg_names, sfreq, preprocess, bandpower, artifacts, state)
        kernels.warm_up()  # compile / load the per-chunk kernels now, not on the first chunk

        self.preprocess_settings = preprocess
        self.bandpower_settings = bandpower
        self.artifact_settings = artifacts
        self.state_settings = state
        self.ch_names = ch_names
        self.sfreq = sfreq
        self.eeg_names = eeg_names
        self._eeg_idx = eeg_idx
        self._eeg_all = len(eeg_idx) == len(ch_names)

        self._groups = bandpower.resolved_groups(eeg_names)
        used = [c for c in eeg_names if any(c in g for g in self._groups.values())]
        self.used_names = tuple(used)
        self._used_idx = np.array([eeg_names.index(c) for c in used], dtype=int)
        self._used_cols = self._used_idx.astype(np.int64)
        self._bp_cols = False
        self._default_bands = {k: tuple(v) for k, v in bandpower.bands.items()}
        self._feature_refs = state.resolved_features(self._groups)
        # derived rows (ratio, relative, asymmetry) appended to the band axis of the power
        # array, as power ratios, so log10 gives the feature and everything downstream (the
        # baseline, z, the label machine) treats them like bands
        self._derived = list(
            {f.derived: f for f in self._feature_refs if f.derived is not None}.values()
        )
        self._derived_names = tuple(f.derived for f in self._derived)
        self.feature_names = tuple(f.name for f in self._feature_refs)
        self._weights = np.array([f.weight for f in self._feature_refs])
        self.feature_weights = tuple(f.weight for f in self._feature_refs)
        self._group_list = list(self._groups)

        self._pre = Preprocessor(preprocess, eeg_names, sfreq)
        # rail / non-finite on every EEG channel (each feeds the reference); amplitude, flat and
        # muscle on the watched ones: the score's channels and the blink channels, or the
        # configured list (checking all 64 channels of a cap flagged 98 % of a real recording)
        if artifacts.channels is not None:
            watch = names_mod.resolve_all(artifacts.channels, eeg_names)
        else:
            watch = used + [c for c in blink_channels(artifacts, eeg_names) if c not in used]
        self.watch_names = tuple(c for c in eeg_names if c in watch)
        self._art = ArtifactDetector(artifacts, eeg_names, sfreq, None, self.watch_names)
        self._set_contamination(self._art, self._pre)
        self._learn_n = (
            round(artifacts.learn_s * sfreq) if artifacts.adaptive and artifacts.enabled else 0
        )
        self._learn_x = np.zeros((self._learn_n, len(eeg_names)), dtype=np.float32)
        self._exclude_t = np.zeros((0, 2))
        self._exclude_label = ""

        self._warmup_n = round(state.warmup_s * sfreq)
        self._target_n = max(1, round(state.calibration_s * sfreq))
        self._max_n = max(self._target_n, round(state.calibration_max_s * sfreq))
        if state.settle_s is not None:
            settle_s = state.settle_s
        elif bandpower.method == "iir":
            settle_s = 3.0 * bandpower.smoothing_s
        else:
            settle_s = bandpower.window_s
        self._settle_n = round(settle_s * sfreq)
        # Calibration buffers, sized once: the live band-power features of every calibration
        # sample (all bands x groups) and its artifact flag; with individual_alpha also the
        # preprocessed signal of the grouped channels, to find the alpha peak and re-run the
        # estimator with the new bands (float32 halves the memory: 180 s x 1000 Hz x 6 ch =
        # 4 MB). Keeping the features instead of re-running the estimator at the end cut the
        # finishing chunk from 274 ms to ~10 ms (60 s at 1000 Hz, 6 channels, 5 bands).
        cap = self._max_n + self._settle_n
        n_feat = (len(bandpower.bands) + len(self._derived)) * len(self._groups)
        self._cal_f = np.zeros((cap, n_feat), dtype=np.float32)
        self._cal_x = np.zeros(
            (cap if bandpower.individual_alpha else 0, len(used)), dtype=np.float32
        )
        self._cal_art = np.zeros(cap, dtype=bool)
        # the baseline statistics use every stat_step-th sample (100 per second): the features
        # are smoothed over ~1 s, so denser samples add cost, not information
        self._stat_step = max(1, round(sfreq / BASELINE_RATE_HZ))
        self._machine = LabelMachine(
            state.enter,
            state.leave,
            round(state.dwell_s * sfreq),
            round(state.leave_dwell_s * sfreq),
            state.resume_after_artifact,
        )
        self.reset()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_settings(
        cls,
        preprocess: PreprocessSettings | Any,
        bandpower: BandPowerSettings | None = None,
        artifacts: ArtifactSettings | None = None,
        state: StateSettings | None = None,
        ch_names: Sequence[str] = (),
        sfreq: float = 0.0,
        eeg_mask: Sequence[bool] | None = None,
    ) -> FeatureChain:
        """Build from the four settings models, or from one object with attributes `preprocess`,
        `bandpower`, `artifacts`, `state` (e.g. the session config) passed as the first argument;
        missing sections take their defaults."""
        if not isinstance(preprocess, PreprocessSettings) and hasattr(preprocess, "bandpower"):
            cfg = preprocess
            preprocess = cfg.preprocess
            bandpower = cfg.bandpower
            artifacts = cfg.artifacts
            state = cfg.state
        return cls(
            preprocess or PreprocessSettings(),
            bandpower or BandPowerSettings(),
            artifacts or ArtifactSettings(),
            state or StateSettings(),
            ch_names,
            sfreq,
            eeg_mask,
        )

    def _make_estimator(self, bands: dict[str, tuple[float, float]]):
        est = make_estimator(
            self.bandpower_settings, bands, self._groups, self.used_names, self.sfreq
        )
        # the IIR estimator reads its channels straight out of the referenced block
        self._bp_cols = isinstance(est, IirBandPower)
        return est

    def _set_bands(self, bands: dict[str, tuple[float, float]]) -> None:
        self.bands = dict(bands)
        self.band_names = tuple(bands)
        rows = self.band_names + self._derived_names
        self._row_names = rows
        self._derived_idx = [
            (
                f.kind,
                self.band_names.index(f.band),
                [self.band_names.index(b) for b in f.over or []],
                self._group_list.index(f.versus) if f.versus in self._group_list else -1,
            )
            for f in self._derived
        ]
        self._feat_idx = (
            np.array([rows.index(f.derived or f.band) for f in self._feature_refs], dtype=int),
            np.array([self._group_list.index(f.group) for f in self._feature_refs], dtype=int),
        )
        self._all_feature_names = tuple(f"{b}@{g}" for b in rows for g in self._group_list)

    # ------------------------------------------------------------------ life cycle
    def reset(self) -> None:
        """Forget everything: filter states, flags, baseline, labels (bands back to configured)."""
        self._pre.reset()
        self._art.reset()
        self._set_bands(self._default_bands)
        self._bp = self._make_estimator(self.bands)
        self._last_finite = np.zeros(len(self.eeg_names))
        self._seen = 0
        self._median = np.full(len(self._feature_refs), _NAN)
        self._scale = np.full(len(self._feature_refs), _NAN)
        self._baseline: dict[str, tuple[float, float]] = {}
        self.individual_alpha_hz: float | None = None
        self._calibrating = False
        self._cal_len = 0
        self._cal_clean = 0
        self._pre.set_bad([])
        self._set_contamination(self._art, self._pre)
        self.bad_channels: dict[str, str] = {}
        self.calibration_failure: str | None = None
        self.calibration_note = ""
        self.calibrated_at = _NAN  # stream time of the sample that completed the baseline
        self.baseline_score: dict[str, float] = {}
        self._learn_from = self._collect_from = self._warmup_n
        self._learn_len = 0
        self._learn_due = False
        self._t_first = _NAN
        self._mon: deque[list] = deque(maxlen=RECENT_S)
        self._mon_sec = -1
        m = self._machine
        m.label = Label.UNCALIBRATED
        m.t_changed = _NAN
        m.above_n = m.below_n = 0
        m.before_artifact = Label.NON_TARGET
        m.transitions.clear()
        self._latest = np.full((len(self._row_names), len(self._groups)), _NAN)
        # kernels.decide's machine state and its outputs (label changes, per-sample values),
        # sized for the largest block so far
        self._mst = np.zeros(7, dtype=np.int64)
        self._mfst = np.zeros(3)
        self._cap = 0
        self._grow(64)
        self._latest_buf = np.full((len(self._row_names), len(self._groups)), _NAN)
        self._grids: dict[tuple[int, int], np.ndarray] = {}
        self._time_in_label = dict.fromkeys(Label, 0.0)
        self._t_last = _NAN
        self._state = State(
            t_stream=_NAN, label=Label.UNCALIBRATED, score=_NAN, time_in_state_s=0.0
        )
        self._pending_label: Label | None = None
        if self.state_settings.auto_calibrate:
            self.start_calibration()

    def start_calibration(self) -> None:
        """Begin (or restart) collecting a baseline from the next sample on (drops the old one)."""
        self._calibrating = True
        self._cal_len = 0
        self._cal_clean = 0
        # learning (bad channels, limits) starts at the next sample after the warm-up, the
        # baseline collection after it
        self._learn_from = max(self._seen, self._warmup_n)
        self._collect_from = self._learn_from + self._learn_n
        self._learn_len = 0
        self._learn_due = False
        self.calibration_failure = None
        self.calibration_note = ""
        self.calibrated_at = _NAN
        self.baseline_score = {}
        self._mon.clear()
        self._mon_sec = -1
        self._median[:] = _NAN
        self._scale[:] = _NAN
        self._baseline = {}
        self._pending_label = Label.CALIBRATING

    def finish_calibration(self) -> None:
        """Finish now with the clean data collected so far (ValueError if under MIN_BASELINE_S)."""
        if not self._calibrating:
            raise ValueError("not calibrating")
        if self._cal_clean < MIN_BASELINE_S * self.sfreq:
            clean_s = self._cal_clean / self.sfreq
            raise ValueError(
                f"too little clean calibration data: {clean_s:.1f} s (need {MIN_BASELINE_S:g} s)"
            )
        self._finish_collected()
        self.calibrated_at = self._state.t_stream
        self.calibration_note = f"finished by request with {self._cal_clean / self.sfreq:.1f} s"
        self._pending_label = Label.NON_TARGET

    def _finish_collected(self) -> None:
        """Finish the live calibration with what the buffers hold (they end at the current
        sample, so an estimator re-run over them can take over live)."""
        m = self._cal_len
        x = self._cal_x[:m] if self.bandpower_settings.individual_alpha else None
        self._finish(x, self._cal_art[:m], self._cal_f[:m], replace=True)

    def calibrate_on(self, data: Iterable[Chunk] | Any) -> dict[str, tuple[float, float]]:
        """Baseline from a separate calibration recording (an mne Raw in volts with this stream's
        channel names, or an iterable of Chunks). The live filter states are not touched; with
        individual_alpha the band estimator restarts with the new bands. Returns the baseline."""
        pre = Preprocessor(self.preprocess_settings, self.eeg_names, self.sfreq)
        art = ArtifactDetector(
            self.artifact_settings, self.eeg_names, self.sfreq, None, self.watch_names
        )
        self._set_contamination(art, pre)
        if hasattr(data, "get_data"):
            arr = data.get_data(picks=list(self.ch_names)).T
            blocks: Iterable[np.ndarray] = [arr]
        else:
            blocks = (c.data for c in data)
        xs, arts = [], []
        last = np.zeros(len(self.eeg_names))
        for block in blocks:
            raw = np.asarray(block, dtype=np.float64)[:, self._eeg_idx]
            if raw.shape[0] == 0:
                continue
            finite = np.isfinite(raw)
            nonfinite = None
            filled = raw
            if not finite.all():
                nonfinite = ~finite
                filled = fill_nonfinite(raw.copy(), finite, last)
            else:
                last[:] = raw[-1]
            filt = pre.filter(filled)
            ref = pre.reference(filt)
            art.process(raw, filt, ref, nonfinite)
            arts.append(art.held)
            xs.append(ref[:, self._used_idx])
        if not xs:
            raise ValueError("calibration recording is empty")
        x = np.concatenate(xs)[self._warmup_n :]
        a = np.concatenate(arts)[self._warmup_n :]
        if np.count_nonzero(~a[self._settle_n :]) < MIN_BASELINE_S * self.sfreq:
            raise ValueError(f"calibration recording has under {MIN_BASELINE_S:g} s of clean data")
        self._calibrating = False
        self._finish(x, a, None, replace=False)
        self._pending_label = Label.NON_TARGET
        return self.baseline

    def _finish(
        self,
        x: np.ndarray | None,
        art: np.ndarray,
        feats: np.ndarray | None,
        *,
        replace: bool,
    ) -> None:
        """Baseline from calibration data: x (m, n_used) preprocessed signal (needed for
        individual_alpha or when feats is None), art (m,) flags, feats (m, n_bands * n_groups)
        features already computed live. replace: x ends at the current sample, so an estimator
        re-run over it takes over live when the bands change."""
        bands = dict(self._default_bands)
        bp = self.bandpower_settings
        if bp.individual_alpha and x is not None:
            grp = bp.alpha_group or (
                "posterior" if "posterior" in self._groups else self._group_list[0]
            )
            cols = [self.used_names.index(c) for c in self._groups[grp]]
            clean = x[self._settle_n :][~art[self._settle_n :]][:, cols].astype(np.float64)
            iaf = individual_alpha_peak(clean, self.sfreq, bp.alpha_search_hz)
            self.individual_alpha_hz = iaf
            for name, (lo, hi) in bp.individual_bands.items():
                bands[name] = (iaf + lo, iaf + hi)
        if feats is None or bands != self.bands:
            assert x is not None
            est = self._make_estimator(bands)
            power = est.process(x.astype(np.float64), art)
            if self._derived:
                power = self._augment(power)
            feats = to_output(power, bp.output).reshape(len(x), -1)
            if bands != self.bands:
                self._set_bands(bands)
                self._bp = est if replace else self._make_estimator(bands)
        keep = ~art
        keep[: self._settle_n] = False
        keep[np.arange(len(keep)) % self._stat_step != 0] = False
        med, mad = robust_stats(np.asarray(feats[keep], dtype=np.float64))
        names = self._all_feature_names
        self._baseline = {n: (float(m), float(d)) for n, m, d in zip(names, med, mad, strict=True)}
        bi, gi = self._feat_idx
        flat = bi * len(self._groups) + gi
        self._median = med[flat].copy()
        self._scale = np.maximum(mad[flat] * MAD_TO_SD, self.state_settings.mad_floor)
        self._calibrating = False
        # the baseline's own score distribution: a baseline taken in the target state shows
        # as a wide or high spread here (the operator sees it with the calibration event)
        z = (np.asarray(feats[keep], dtype=np.float64)[:, flat] - self._median) / self._scale
        score = z @ self._weights
        if score.size:
            p10, p50, p90 = np.percentile(score, [10, 50, 90]).tolist()
            above = float(np.mean(score > self._machine.enter))
            self.baseline_score = {"p10": p10, "p50": p50, "p90": p90, "above_enter": above}

    # ------------------------------------------------------------------ the hot path
    def step(self, chunk: Chunk) -> State:
        """Process one chunk; returns the state after its last sample."""
        n = chunk.n_samples
        if n == 0:
            return self._state
        if self._learn_len < self._learn_n and self._calibrating:
            return self._run_split(chunk, self.grid(n, n))[-1]
        return self._run(chunk, self.grid(n, n))[-1]

    def step_every(self, chunk: Chunk, every: int) -> list[State]:
        """Process one block; return the State after every `every`-th sample and after the last.

        The states equal those of `step` fed the same samples as `every`-sample chunks (the
        first starting at this block's first sample), with the per-sample work done once for
        the whole block (offline: large blocks, decisions on the live chunk grid).
        """
        return self.step_at(chunk, self.grid(chunk.n_samples, every))

    def step_at(self, chunk: Chunk, grid: np.ndarray) -> list[State]:
        """Process one block; return the State after each sample index of `grid` (int64,
        sorted, unique, ending at n - 1), equal to `step` fed chunks that end there."""
        if chunk.n_samples == 0:
            return []
        if self._learn_len < self._learn_n and self._calibrating:
            return self._run_split(chunk, grid)
        return self._run(chunk, grid)

    def _run_split(self, chunk: Chunk, grid: np.ndarray) -> list[State]:
        """`_run`, cut at the sample where learning ends when it falls inside the block, so the
        learnt limits, bad channels and reference apply from the same sample whatever the
        chunking (a State made only at the cut is not returned)."""
        n = chunk.n_samples
        e = self._learn_from + self._learn_n - self._seen
        if not 0 < e < n:
            return self._run(chunk, grid)
        g1 = grid[grid < e]
        extra = len(g1) == 0 or g1[-1] != e - 1
        if extra:
            g1 = np.append(g1, np.int64(e - 1))
        d, t = chunk.data, chunk.timestamps
        first = self._run(Chunk(d[:e], t[:e], chunk.ch_names, chunk.sfreq), g1)
        if extra:
            first = first[:-1]
        rest = Chunk(d[e:], t[e:], chunk.ch_names, chunk.sfreq)
        return first + self._run(rest, grid[grid >= e] - e)

    def grid(self, n: int, every: int) -> np.ndarray:
        """Sample indices every-1, 2 every-1, ... and n-1 of an n-sample block (int64, cached)."""
        grid = self._grids.get((n, every))
        if grid is None:
            grid = np.arange(every - 1, n, every, dtype=np.int64)
            if n % every:
                grid = np.append(grid, np.int64(n - 1))
            self._grids[(n, every)] = grid
        return grid

    def _run(self, chunk: Chunk, grid: np.ndarray) -> list[State]:
        """The chain over one non-empty block; the States after the samples of `grid` (sorted
        int64 indices ending with n - 1)."""
        n = chunk.n_samples
        raw = chunk.data if self._eeg_all else chunk.data[:, self._eeg_idx]
        nonfinite = None
        res = self._pre.process(raw, self._last_finite)  # None: a non-finite sample in raw
        if res is None:
            finite = np.isfinite(raw)
            nonfinite = ~finite
            filled = fill_nonfinite(np.array(raw, dtype=np.float64), finite, self._last_finite)
            res = self._pre.process(filled, self._last_finite)
            assert res is not None
        filt, ref = res
        art = self._art.process(raw, filt, ref, nonfinite, grid)
        held = self._art.held  # the flags that can reach the score (hold powers and baseline)
        t = chunk.timestamps
        calibrating = self._calibrating
        if calibrating:
            if math.isnan(self._t_first):
                self._t_first = float(t[0])
            if self._learn_len < self._learn_n:
                self._store_learning(filt)
            excl = self._excluded_at(t)
            self._monitor(held, excl, n)
        m = self._machine
        m.transitions.clear()
        if self._pending_label is not None:
            m.set(self._pending_label, float(t[0]))
            self._pending_label = None
        pre_label, pre_changed = m.label, m.t_changed  # the label before a calibration ends

        k = 0  # first sample with a calibrated label machine
        x = None  # the estimator's channels of ref, when needed as an array
        if self._bp_cols:
            power = self._bp.process(ref, held, cols=self._used_cols)
        else:
            x = ref[:, self._used_idx]
            power = self._bp.process(x, held)
        if self._derived:
            power = self._augment(power)
        if self._calibrating:
            if x is None and self._cal_x.shape[0]:
                x = ref[:, self._used_idx]
            k = self._collect(x, held, power, excl)
            if not self._calibrating and self.calibration_failure is not None:
                m.set(Label.UNCALIBRATED, float(t[k - 1]))  # failed at its hard end
                k = n
            elif not self._calibrating:  # finished at sample k - 1: samples k.. are labelled
                live = self._bp
                self._finish_collected()
                if self._bp is not live and k < n:  # new bands: the new estimator takes over
                    new = self._bp.process(ref[k:, self._used_idx], held[k:])
                    power[k:] = self._augment(new) if self._derived else new
                m.set(Label.NON_TARGET, float(t[k - 1]))
                self.calibrated_at = float(t[k - 1])
            else:
                k = n

        # samples start.. are scored (the one that completed a calibration included); the
        # label machine steps from k
        start = n if m.label in (Label.UNCALIBRATED, Label.CALIBRATING) else max(k - 1, 0)
        if start < n:
            st, fst = self._mst, self._mfst
            st[0], st[1], st[2], st[3] = (
                _CODE[m.label],
                m.above_n,
                m.below_n,
                _CODE[m.before_artifact],
            )
            st[4], st[5], st[6] = m.dwell_n, m.leave_dwell_n, m.resume
            fst[0], fst[1], fst[2] = m.enter, m.leave, m.t_changed
            if n > self._cap:
                self._grow(n)
            n_tr, self._score_last = kernels.decide(
                power,
                start,
                k,
                self.bandpower_settings.output == "log",
                self._feat_idx[0],
                self._feat_idx[1],
                self._median,
                self._scale,
                self._weights,
                art,
                np.ascontiguousarray(t, dtype=np.float64),  # one compiled variant
                st,
                fst,
                self._tr_idx,
                self._tr_code,
                self._latest_buf,
                self._lab,
                self._above,
                self._changed,
                self._score,
                self._feat,
                self._z,
            )
            if k < n:
                m.label, m.above_n, m.below_n = _LABELS[st[0]], int(st[1]), int(st[2])
                m.before_artifact, m.t_changed = _LABELS[st[3]], float(fst[2])
                for i in range(n_tr):
                    m.transitions.append((float(t[self._tr_idx[i]]), _LABELS[self._tr_code[i]]))
            self._latest = self._latest_buf
        else:
            self._latest = to_output(power[-1], self.bandpower_settings.output)
        self._seen += n
        if self._learn_due:  # the block ended where learning ends (see _run_split)
            self._learn_due = False
            self._learn()
        if len(grid) == 1:  # live: one State, read without a numpy call per field
            return [self._state_after(t, power, start, pre_label, pre_changed)]
        return self._states(t, power, grid, start, pre_label, pre_changed)

    def _state_after(
        self, t: np.ndarray, power: np.ndarray, start: int, pre_label: Label, pre_changed: float
    ) -> State:
        """The State after the block's last sample (what `_states` gives for grid [n - 1]).

        The hot path live: every numpy call here starts cold when chunks come every 10 ms
        (~45 µs instead of ~2 µs on this VM), so the fields come from the label machine and
        two row reads."""
        n = t.shape[0]
        tb = float(t[n - 1])
        m = self._machine
        names = self.feature_names
        if n - 1 < start:  # not yet calibrated
            label, score, t_chg, prog, z = pre_label, _NAN, pre_changed, 0.0, {}
            bi, gi = self._feat_idx
            feats = self._latest[bi, gi].tolist()
        else:
            label, score, t_chg = m.label, self._score_last, m.t_changed
            feats = self._feat_rows[n - 1].tolist()
            z = dict(zip(names, self._z_rows[n - 1].tolist(), strict=True))
            prog = m.dwell_progress if label in (Label.NON_TARGET, Label.TARGET) else 0.0
        art = self._art
        return self._emit(tb, label, score, t_chg, prog, feats, z, art.reasons, art.held_now)

    def _emit(
        self,
        tb: float,
        label: Label,
        score: float,
        t_changed: float,
        progress: float,
        feats: list[float],
        z: dict[str, float],
        artifacts: tuple[str, ...],
        held: bool,
    ) -> State:
        """The State after stream time tb (time in the previous label accounted)."""
        if not math.isnan(self._t_last):
            self._time_in_label[self._state.label] += tb - self._t_last
        self._t_last = tb
        self._state = State(
            t_stream=tb,
            label=label,
            score=score,
            time_in_state_s=0.0 if math.isnan(t_changed) else tb - t_changed,
            dwell_progress=progress,
            features=dict(zip(self.feature_names, feats, strict=True)),
            z=z,
            artifacts=artifacts,
            held=held,
        )
        return self._state

    def _states(
        self,
        t: np.ndarray,
        power: np.ndarray,
        grid: np.ndarray,
        start: int,
        pre_label: Label,
        pre_changed: float,
    ) -> list[State]:
        """The States after the grid samples: samples before `start` keep pre_label (not yet
        calibrated: no score, no z); later ones read kernels.decide's per-sample outputs.

        Everything per grid sample is gathered as Python lists first: one numpy call per
        quantity per block, not per State."""
        rows = grid
        names = self.feature_names
        n_pre = int(np.searchsorted(rows, start))  # grid samples before start
        times = t[rows].tolist()
        if n_pre:  # not yet calibrated
            pre = power[rows[:n_pre]]
            bi, gi = self._feat_idx
            pre_feats = to_output(pre, self.bandpower_settings.output)[:, bi, gi].tolist()
        if n_pre < len(rows):
            post = rows[n_pre:]
            labels = [_LABELS[c] for c in self._lab[post].tolist()]
            scores = self._score[post].tolist()
            changed = self._changed[post].tolist()
            feats = self._feat[post].tolist()
            zs = self._z[post].tolist()
            dwell = (np.minimum(1.0, self._above[post] / self._machine.dwell_n)).tolist()
        flagged = self._art.grid_active.tolist()
        held = self._art.grid_held
        states = []
        for g, tb in enumerate(times):
            if g < n_pre:
                label, score, t_chg, prog, z = pre_label, _NAN, pre_changed, 0.0, {}
                f = pre_feats[g]
            else:
                i = g - n_pre
                label, score, t_chg, f = labels[i], scores[i], changed[i], feats[i]
                z = dict(zip(names, zs[i], strict=True))
                if label is Label.TARGET:
                    prog = 1.0
                else:
                    prog = dwell[i] if label is Label.NON_TARGET else 0.0
            reasons = self._art.reasons_at(g) if flagged[g] else ()
            states.append(self._emit(tb, label, score, t_chg, prog, f, z, reasons, held[g]))
        return states

    def _grow(self, n: int) -> None:
        """Room for n samples in kernels.decide's outputs (allocated by the first larger block)."""
        n_f = len(self._feature_refs)
        self._cap = n
        self._tr_idx = np.zeros(n, dtype=np.int64)
        self._tr_code = np.zeros(n, dtype=np.int64)
        self._lab = np.zeros(n, dtype=np.int64)
        self._above = np.zeros(n, dtype=np.int64)
        self._changed = np.full(n, _NAN)
        self._score = np.full(n, _NAN)
        self._feat = np.full((n, n_f), _NAN)
        self._z = np.full((n, n_f), _NAN)
        # row views made once: the live path reads the last row without a numpy call
        self._feat_rows = list(self._feat)
        self._z_rows = list(self._z)
        self._score_last = _NAN

    def _collect(
        self, x: np.ndarray | None, art: np.ndarray, power: np.ndarray, excl: np.ndarray | None
    ) -> int:
        """Store calibration samples (features of `power` (n, n_bands, n_groups), flags, and
        the signal x when needed); returns how many of this block's samples it consumed (n, or
        the index just after the sample that completed or failed the calibration); x may be
        None when the signal is not kept; excl (n,) bool: samples annotated as the target."""
        n = power.shape[0]
        i = max(0, min(n, self._collect_from - self._seen))  # skip the warm-up and learning
        if i >= n:
            return n
        feats = to_output(power, self.bandpower_settings.output).reshape(n, -1)
        # a sample without an estimate yet (welch: nan until a window free of held samples is
        # full) is no baseline data, like an artifact (it made the whole baseline nan)
        unusable = art if np.isfinite(feats).all() else art | ~np.isfinite(feats).all(axis=1)
        if excl is not None:
            unusable = unusable | excl
        keep_x = self._cal_x.shape[0] > 0
        cap = self._cal_f.shape[0]
        need = self._target_n
        while i < n:
            space = cap - self._cal_len
            take = min(n - i, space)
            a = unusable[i : i + take]
            # samples of this slice still inside the settle time do not count
            skip = min(take, max(0, self._settle_n - self._cal_len))
            counted_n = take - skip - int(np.count_nonzero(a[skip:]))
            hit = self._cal_clean + counted_n >= need
            if hit:  # the sample that completes the baseline is in this slice: find it
                counted = ~a
                counted[:skip] = False
                cum = self._cal_clean + np.cumsum(counted)
                take = int(np.flatnonzero(cum >= need)[0]) + 1
                clean_after = int(cum[take - 1])
            else:
                clean_after = self._cal_clean + counted_n
            j = self._cal_len
            self._cal_f[j : j + take] = feats[i : i + take]
            if keep_x:
                self._cal_x[j : j + take] = x[i : i + take]
            self._cal_art[j : j + take] = unusable[i : i + take]
            self._cal_len += take
            self._cal_clean = clean_after
            i += take
            if hit:
                self._calibrating = False
                return i
            if self._cal_len >= cap:  # calibration_max_s: a hard end, never a restart
                self._calibrating = False
                if self._cal_clean >= max(need // 2, MIN_BASELINE_S * self.sfreq):
                    self.calibration_note = (
                        f"finished short at calibration_max_s: {self._cal_clean / self.sfreq:.1f}"
                        f" of {need / self.sfreq:g} s clean"
                    )
                else:
                    self.calibration_failure = self._failure_text()
                return i
        return n

    def _augment(self, power: np.ndarray) -> np.ndarray:
        """power (n, n_bands, n_groups) V² -> (n, n_bands + n_derived, n_groups): the derived
        rows as power ratios (ratio: band / sum of `over`; relative: band / sum of all bands;
        asymmetry: band in each group / in `versus`)."""
        n, nb, ng = power.shape
        out = np.empty((n, nb + len(self._derived_idx), ng))
        out[:, :nb] = power
        floor = 1e-30
        for r, (kind, b, over, versus) in enumerate(self._derived_idx, start=nb):
            if kind == "ratio":
                den = power[:, over].sum(axis=1)
                out[:, r] = power[:, b] / np.maximum(den, floor)
            elif kind == "relative":
                out[:, r] = power[:, b] / np.maximum(power.sum(axis=1), floor)
            else:  # asymmetry
                out[:, r] = power[:, b] / np.maximum(power[:, b, versus], floor)[:, None]
        return out

    # ------------------------------------------------------------------ calibration helpers
    def exclude_from_calibration(
        self, intervals: Sequence[tuple[float, float]], label: str
    ) -> None:
        """Stream-time intervals (start, end) s never used as baseline (offline: the stretches
        annotated as the target state, `label`)."""
        iv = sorted((float(a), float(b)) for a, b in intervals if b > a)
        merged: list[list[float]] = []
        for a, b in iv:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self._exclude_t = np.array(merged, dtype=np.float64).reshape(-1, 2)
        self._exclude_label = label

    def _excluded_at(self, t: np.ndarray) -> np.ndarray | None:
        """(n,) bool: samples inside an excluded interval (None when there are none)."""
        ex = self._exclude_t
        if not ex.shape[0] or t[-1] < ex[0, 0] or t[0] >= ex[-1, 1]:
            return None
        j = np.searchsorted(ex[:, 0], t, side="right") - 1
        return (j >= 0) & (t < ex[np.maximum(j, 0), 1])

    def _set_contamination(
        self, art: ArtifactDetector, pre: Preprocessor, bad: Iterable[str] = ()
    ) -> None:
        """Tell `art` which flags can reach the score: every flag of the channels of the groups
        the score's features use and of channels with a share of their reference >= LEAK_HOLD;
        others only by sheer size. Groups shown but not scored (and a decider plugin reading
        them) see such channels' powers through their artifacts."""
        leak = np.zeros(len(self.eeg_names))
        ref = pre.reference_indices
        if len(ref):
            leak[ref] = 1.0 / len(ref)
        bad = set(bad)
        groups = {g for f in self._feature_refs for g in (f.group, f.versus) if g}
        scored = {c for g in groups for c in self._groups.get(g, ())}
        hold = [c for c in self.used_names if c in scored and c not in bad]
        hold += [
            c for c, w in zip(self.eeg_names, leak, strict=True) if w >= LEAK_HOLD and c not in hold
        ]
        art.set_contamination(hold, leak)

    def _store_learning(self, filt: np.ndarray) -> None:
        """Keep the filtered signal of the learning samples of this block."""
        a = max(0, self._learn_from - self._seen)
        b = min(filt.shape[0], self._learn_from + self._learn_n - self._seen)
        if a < b:
            j = self._learn_len
            self._learn_x[j : j + b - a] = filt[a:b]
            self._learn_len += b - a
            self._learn_due = self._learn_len == self._learn_n

    def _learn(self) -> None:
        """Bad channels and per-channel limits from the learning samples; applied from the
        next sample on (reference, groups, checks)."""
        x = self._learn_x.astype(np.float64)
        names = self.eeg_names
        s = self.artifact_settings
        bad = find_bad_channels(x, names, self.sfreq, s) if s.bad_channels else {}
        self.bad_channels = bad
        bad_idx = [names.index(c) for c in bad]
        self._pre.set_bad(bad_idx)
        self._art.reset_limits()
        self._art.exclude(list(bad))
        self._set_contamination(self._art, self._pre, bad)
        groups = {g: [c for c in chans if c not in bad] for g, chans in self._groups.items()}
        empty = [g for g, chans in groups.items() if not chans]
        if empty:
            self._calibrating = False
            self._pending_label = Label.UNCALIBRATED
            self.calibration_failure = (
                f"calibration failed: every channel of group(s) {', '.join(empty)} is bad ("
                + "; ".join(f"{c}: {r}" for c, r in bad.items())
                + "). Fix those electrodes, or set bandpower.groups to good channels."
            )
            return
        gm = group_matrix(groups, self.used_names)
        self._bp._gm[...] = gm
        self._active_groups = groups
        ref = self._pre.reference(x)
        amp, mus = learn_limits(ref, self.sfreq, s)
        self._art.set_limits(amp, mus)

    def _monitor(self, art: np.ndarray, excl: np.ndarray | None, n: int) -> None:
        """Per-second tallies of the flags while calibrating (what holds the baseline back)."""
        sec = (self._seen + n - 1) // max(1, round(self.sfreq))
        if sec != self._mon_sec:
            self._mon_sec = sec
            self._mon.append([0, 0, 0, np.zeros((len(KINDS), len(self.eeg_names)), np.int64), 0])
        b = self._mon[-1]
        counts, n_grid = self._art.flag_counts()
        counts = counts * self._art.hold_mask  # flags that cannot reach the score hold nothing
        b[0] += n
        b[1] += int(np.count_nonzero(art))
        b[2] += n_grid
        b[3] += counts
        if excl is not None:
            b[4] += int(np.count_nonzero(excl & ~art))

    def _recent(self) -> tuple[float, float, list[tuple[str, float]]]:
        """Over the last RECENT_S seconds: share flagged, share annotated as the target, and
        the (kind:channel, share of decisions) flagged most, largest first (>= 5 %)."""
        mon = list(self._mon)
        n = sum(b[0] for b in mon)
        if not n:
            return 0.0, 0.0, []
        flagged = sum(b[1] for b in mon) / n
        target = sum(b[4] for b in mon) / n
        n_grid = max(1, sum(b[2] for b in mon))
        counts = sum(b[3] for b in mon) / n_grid
        order = np.argsort(counts, axis=None)[::-1][:6]
        top = []
        for flat in order.tolist():
            k, j = divmod(flat, counts.shape[1])
            if counts[k, j] >= 0.05:
                top.append((f"{KINDS[k]}:{self.eeg_names[j]}", float(counts[k, j])))
        return flagged, target, top

    def _advice(self, top: list[tuple[str, float]], target: float) -> str:
        """What to change, from what is flagged most."""
        tips = []
        kinds: dict[str, list[str]] = {}
        for reason, _ in top:
            kind, ch = reason.split(":", 1)
            kinds.setdefault(kind, []).append(ch)
        if "amplitude" in kinds:
            tips.append(
                f"check electrode(s) {', '.join(kinds['amplitude'])} (blinks, movement, a loose "
                "contact), or raise artifacts.amplitude_uv, or list artifacts.channels without them"
            )
        if "muscle" in kinds:
            tips.append(
                f"muscle on {', '.join(kinds['muscle'])}: ask the participant to relax jaw and "
                "face, or raise artifacts.muscle_ratio"
            )
        if "flat" in kinds or "rail" in kinds or "nonfinite" in kinds:
            chans = kinds.get("flat", []) + kinds.get("rail", []) + kinds.get("nonfinite", [])
            tips.append(f"electrode(s) {', '.join(chans)} flat or saturated: reconnect them")
        if target > 0.2:
            tips.append(
                f"the recording is annotated '{self._exclude_label}' there (never baseline)"
            )
        tips.append("or lower state.calibration_s / raise state.calibration_max_s")
        return "; ".join(tips)

    def _failure_text(self) -> str:
        flagged, target, top = self._recent()
        need_s = self._target_n / self.sfreq
        worst = ", ".join(f"{r} {v:.0%}" for r, v in top[:4]) or "no single channel"
        return (
            f"calibration failed at calibration_max_s "
            f"({self.state_settings.calibration_max_s:g} s of collection): "
            f"{self._cal_clean / self.sfreq:.1f} of {need_s:g} s clean; "
            f"{flagged:.0%} of the last {RECENT_S} s flagged ({worst}). "
            f"Change: {self._advice(top, target)}"
        )

    def calibration_report(self) -> dict[str, Any]:
        """Where the calibration stands and what holds it back (not for the per-chunk path).

        phase: idle, warmup, learning, collecting, done, failed; clean_s / target_s; elapsed_s
        (collection so far) / max_s; recent_flagged (share of the last RECENT_S s held back by
        a flag that reaches the score), recent_target (share annotated as the target), top
        (kind:channel, share) holding it back most, advice, bad_channels, watched, hold (the
        channels whose every flag holds), limits (learnt, per watched channel), failure, note."""
        flagged, target, top = self._recent()
        if self.calibration_failure is not None:
            phase = "failed"
        elif self.calibrated:
            phase = "done"
        elif not self._calibrating:
            phase = "idle"
        elif self._seen < self._learn_from:
            phase = "warmup"
        elif self._seen < self._collect_from:
            phase = "learning"
        else:
            phase = "collecting"
        return {
            "phase": phase,
            "progress": self.calibration_progress,
            "clean_s": round(self._cal_clean / self.sfreq, 3),
            "target_s": self.state_settings.calibration_s,
            "elapsed_s": round(max(0, self._cal_len - self._settle_n) / self.sfreq, 3),
            "max_s": self.state_settings.calibration_max_s,
            "calibrated_at": self.calibrated_at,
            "t_first": self._t_first,
            "recent_s": RECENT_S,
            "recent_flagged": round(flagged, 4),
            "recent_target": round(target, 4),
            "top": [[r, round(v, 4)] for r, v in top],
            "advice": self._advice(top, target) if top or target > 0.2 else "",
            "bad_channels": dict(self.bad_channels),
            # a watched channel found bad is checked no more (it left the reference too)
            "watched": [c for c in self.watch_names if c not in self.bad_channels],
            "hold": list(self.hold_channels),
            "eeg": list(self.eeg_names),
            "limits": self._art.limits,
            "failure": self.calibration_failure,
            "note": self.calibration_note,
            "baseline_score": dict(self.baseline_score),
        }

    @property
    def min_duration_s(self) -> float:
        """Shortest recording that can calibrate: warm-up + learning + settle + calibration_s."""
        return (self._warmup_n + self._learn_n + self._settle_n + self._target_n) / self.sfreq

    # ------------------------------------------------------------------ read-only views
    @property
    def state(self) -> State:
        """The latest State (before any data: uncalibrated, t_stream nan)."""
        return self._state

    @property
    def calibrated(self) -> bool:
        return bool(self._baseline)

    @property
    def calibrating(self) -> bool:
        return self._calibrating

    @property
    def calibration_progress(self) -> float:
        """0..1: clean calibration samples collected over calibration_s (1.0 once calibrated)."""
        if self.calibrated:
            return 1.0
        if not self._calibrating:
            return 0.0
        return min(1.0, self._cal_clean / self._target_n)

    @property
    def baseline(self) -> dict[str, tuple[float, float]]:
        """Feature 'band@group' -> (median, MAD) of the baseline (empty before calibration)."""
        return dict(self._baseline)

    @property
    def thresholds(self) -> tuple[float, float]:
        return self._machine.enter, self._machine.leave

    def set_thresholds(self, enter: float, leave: float) -> None:
        """Change enter / leave (ValueError unless enter > leave, both finite)."""
        check_thresholds(enter, leave)
        self._machine.enter = float(enter)
        self._machine.leave = float(leave)

    @property
    def latest_band_powers(self) -> dict[str, float]:
        """'band@group' -> latest band power (log10 V² or relative, as configured)."""
        vals = self._latest.ravel().tolist()
        return dict(zip(self._all_feature_names, vals, strict=True))

    @property
    def artifact_flags(self) -> tuple[str, ...]:
        """Active artifact reasons (incl. hold-off), e.g. ('amplitude:Fp1',)."""
        return self._art.reasons

    @property
    def last_transitions(self) -> tuple[tuple[float, Label], ...]:
        """(t_stream, new label) of every label change inside the latest chunk, in order."""
        return tuple(self._machine.transitions)

    @property
    def time_in_label(self) -> dict[str, float]:
        """Stream seconds spent in each label since construction / reset()."""
        return {lab.value: s for lab, s in self._time_in_label.items()}

    @property
    def hold_channels(self) -> tuple[str, ...]:
        """EEG channels whose every artifact flag holds the band powers and the baseline (the
        score's, and those with a share >= LEAK_HOLD of their reference); the other channels'
        flags veto the state but hold only when non-finite, railing or very large."""
        mask = self._art.hold_mask
        return tuple(c for c, m in zip(self._art.check_names, mask, strict=True) if m)

    @property
    def groups(self) -> dict[str, list[str]]:
        return {g: list(c) for g, c in self._groups.items()}
