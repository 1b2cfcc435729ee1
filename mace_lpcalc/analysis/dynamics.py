"""Dynamics observables: mean-squared displacement and the Einstein diffusion coefficient.

Positions must be *unwrapped* (continuous across periodic boundaries), in Å. MDTraj has
no MSD, so the windowed MSD over all time origins is computed here with the FFT
algorithm (Calandrini et al., J. Chim. Phys. 2011; as in nMoldyn), which is O(T log T).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: 1 Å²/ps = 1e-4 cm²/s = 10 × 1e-5 cm²/s.
A2_PS_TO_1E5_CM2_S = 10.0
# Position components transformed per FFT batch: bounds memory for long, large runs.
_VALUES_PER_BATCH = 10_000_000


@dataclass(frozen=True)
class DiffusionCoefficient:
    """Einstein self-diffusion coefficient D = slope(MSD(t)) / 6.

    ``diffusion_A2_ps`` is fitted to the MSD of the whole run over the lag window
    ``[fit_start_ps, fit_end_ps]``; ``stderr_A2_ps`` is the standard error of the mean of
    ``segment_diffusion_A2_ps``, the same fit repeated on ``n_segments`` consecutive,
    non-overlapping segments of the run (independent estimates once a segment is much
    longer than the velocity decorrelation time).
    """

    diffusion_A2_ps: float
    stderr_A2_ps: float
    fit_start_ps: float
    fit_end_ps: float
    segment_diffusion_A2_ps: np.ndarray

    @property
    def n_segments(self) -> int:
        return len(self.segment_diffusion_A2_ps)

    @property
    def diffusion_1e5_cm2_s(self) -> float:
        return self.diffusion_A2_ps * A2_PS_TO_1E5_CM2_S

    @property
    def stderr_1e5_cm2_s(self) -> float:
        return self.stderr_A2_ps * A2_PS_TO_1E5_CM2_S


def mean_squared_displacement(time_ps, positions_A, masses_amu, indices=None, *,
                              remove_com_drift: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Windowed MSD averaged over all time origins and the selected atoms.

    ``time_ps``: shape ``(n_frames,)``, uniformly spaced. ``positions_A``: unwrapped
    positions, Å, shape ``(n_frames, n_atoms, 3)``. ``masses_amu``: shape ``(n_atoms,)``.
    ``indices``: atoms averaged over (default all). With ``remove_com_drift`` the
    mass-weighted centre of mass of *all* atoms is subtracted frame by frame first, so a
    drifting box (thermostat noise, momentum not exactly zero) adds nothing.

    Returns ``lag_ps`` (shape ``(n_frames,)``, ``lag_ps[k] = k·Δt``) and ``msd_A2`` (Å²,
    same shape), ``msd_A2[k] = ⟨|r_i(t+kΔt) − r_i(t)|²⟩`` over atoms i and origins t.
    """
    time_ps, positions_A, indices = _check_trajectory(time_ps, positions_A, masses_amu, indices)
    if remove_com_drift:
        masses = np.asarray(masses_amu, dtype=float)
        centre_of_mass = np.einsum("tai,a->ti", positions_A, masses) / masses.sum()
    else:
        centre_of_mass = np.zeros((len(time_ps), 3))
    n_frames = len(time_ps)
    msd_sum = np.zeros(n_frames)
    atoms_per_batch = max(1, _VALUES_PER_BATCH // (3 * n_frames))
    for start in range(0, len(indices), atoms_per_batch):
        batch = positions_A[:, indices[start:start + atoms_per_batch]] \
            - centre_of_mass[:, None, :]
        msd_sum += _windowed_msd_sum(batch)
    lag_ps = np.arange(n_frames) * (time_ps[1] - time_ps[0])
    return lag_ps, msd_sum / len(indices)


def diffusion_coefficient(time_ps, positions_A, masses_amu, indices=None, *,
                          n_segments: int = 5,
                          fit_window_fraction: tuple[float, float] = (0.1, 0.5),
                          ) -> DiffusionCoefficient:
    """Einstein diffusion coefficient (MSD = 6 D t) with a segment-based standard error.

    Arguments as for :func:`mean_squared_displacement`. The run is cut into
    ``n_segments`` equal consecutive segments of duration T_seg; the MSD is fitted by
    least squares (slope and intercept, so a ballistic offset does not bias D) over lags
    ``fit_window_fraction × T_seg`` — short lags are ballistic, long lags have few
    origins. See :class:`DiffusionCoefficient` for how D and its error are formed.
    """
    time_ps, positions_A, indices = _check_trajectory(time_ps, positions_A, masses_amu, indices)
    if n_segments < 2:
        raise ValueError(f"n_segments must be at least 2 for an error estimate, got {n_segments}")
    low, high = fit_window_fraction
    if not 0 <= low < high <= 1:
        raise ValueError(f"fit_window_fraction={fit_window_fraction} must satisfy "
                         "0 <= low < high <= 1")
    segment_frames = len(time_ps) // n_segments
    first_lag = int(np.ceil(low * (segment_frames - 1)))
    last_lag = int(np.floor(high * (segment_frames - 1)))
    if last_lag - first_lag < 2:
        raise ValueError(
            f"{len(time_ps)} frames cut into {n_segments} segments leave fewer than 3 lags in "
            f"the fit window {fit_window_fraction}; use a longer run or fewer segments")

    def fitted_diffusion(segment: slice) -> float:
        lag_ps, msd_A2 = mean_squared_displacement(time_ps[segment], positions_A[segment],
                                                   masses_amu, indices)
        window = slice(first_lag, last_lag + 1)
        slope, _intercept = np.polyfit(lag_ps[window], msd_A2[window], 1)
        return slope / 6.0

    segments = np.array([fitted_diffusion(slice(k * segment_frames, (k + 1) * segment_frames))
                         for k in range(n_segments)])
    dt_ps = time_ps[1] - time_ps[0]
    return DiffusionCoefficient(
        diffusion_A2_ps=fitted_diffusion(slice(None)),
        stderr_A2_ps=float(segments.std(ddof=1) / np.sqrt(n_segments)),
        fit_start_ps=first_lag * dt_ps,
        fit_end_ps=last_lag * dt_ps,
        segment_diffusion_A2_ps=segments,
    )


def _windowed_msd_sum(positions: np.ndarray) -> np.ndarray:
    """Σ over atoms of the all-origins MSD; positions shape (n_frames, n_atoms, 3)."""
    n_frames = positions.shape[0]
    squared = np.einsum("tai,tai->t", positions, positions)
    # Σ_t |r(t)|² + |r(t+k)|² over the n_frames − k origins, from cumulative sums.
    cumulative = np.concatenate([[0.0], np.cumsum(squared)])
    lags = np.arange(n_frames)
    squared_terms = cumulative[n_frames - lags] + (cumulative[n_frames] - cumulative[lags])
    # Σ_t r(t)·r(t+k) by FFT autocorrelation, zero-padded to avoid wrap-around.
    spectrum = np.fft.rfft(positions, n=2 * n_frames, axis=0)
    autocorrelation = np.fft.irfft(spectrum * spectrum.conj(), axis=0)[:n_frames].sum(axis=(1, 2))
    return (squared_terms - 2.0 * autocorrelation) / (n_frames - lags)


def _check_trajectory(time_ps, positions_A, masses_amu, indices):
    time_ps = np.asarray(time_ps, dtype=float)
    positions_A = np.asarray(positions_A, dtype=float)
    masses_amu = np.asarray(masses_amu, dtype=float)
    if positions_A.ndim != 3 or positions_A.shape[2] != 3:
        raise ValueError("positions_A must have shape (n_frames, n_atoms, 3), "
                         f"got {positions_A.shape}")
    n_frames, n_atoms, _ = positions_A.shape
    if time_ps.shape != (n_frames,):
        raise ValueError(f"time_ps has shape {time_ps.shape}, expected ({n_frames},)")
    if n_frames < 2:
        raise ValueError("an MSD needs at least two frames")
    steps = np.diff(time_ps)
    if steps[0] <= 0 or not np.allclose(steps, steps[0], rtol=1e-3, atol=0.0):
        raise ValueError("time_ps must be increasing with a constant spacing")
    if masses_amu.shape != (n_atoms,) or np.any(masses_amu <= 0):
        raise ValueError(f"masses_amu must be {n_atoms} positive masses, "
                         f"got shape {masses_amu.shape}")
    if not np.all(np.isfinite(positions_A)):
        raise ValueError("positions_A contains non-finite values")
    indices = np.arange(n_atoms) if indices is None else np.asarray(indices, dtype=int).ravel()
    if len(indices) == 0 or indices.min() < 0 or indices.max() >= n_atoms:
        raise ValueError(f"indices must select at least one of the {n_atoms} atoms")
    return time_ps, positions_A, indices
