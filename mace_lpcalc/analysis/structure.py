"""Structure observables: partial radial distribution functions, their first peak, and
coordination numbers.

Distances are computed by MDTraj (minimum image in triclinic cells); MDTraj works in nm,
so everything is converted to Å at this boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations_with_replacement

import mdtraj
import numpy as np
from ase.data import atomic_numbers

NM_TO_A = 10.0
# Pair distances held in memory at once (float32): bounds memory for large boxes.
_MAX_DISTANCES_PER_CHUNK = 20_000_000


@dataclass(frozen=True)
class RadialDistribution:
    """A partial RDF g_AB(r) averaged over frames.

    ``r_A``: bin centres, Å, shape ``(n_bins,)``; ``g``: g_AB at those radii
    (dimensionless, → 1 for an uncorrelated fluid). ``partner_density_per_A3``: number
    density of B atoms seen from an A atom (``N_B/V``, or ``(N_A − 1)/V`` when A = B),
    averaged as ⟨1/V⟩ over frames, so that ∫ 4πr² ρ g dr counts B neighbours of an A atom.
    """

    pair: tuple[str, str]
    r_A: np.ndarray
    g: np.ndarray
    partner_density_per_A3: float


def element_pairs(symbols) -> list[tuple[str, str]]:
    """All unordered element pairs of a structure, heaviest element first.

    For water this is ``[("O", "O"), ("O", "H"), ("H", "H")]``.
    """
    elements = sorted(set(symbols), key=lambda s: -atomic_numbers[s])
    return list(combinations_with_replacement(elements, 2))


def max_rdf_radius_A(trajectory: mdtraj.Trajectory) -> float:
    """Largest radius (Å) where minimum-image distances are complete in every frame.

    That is half the smallest perpendicular width of the cell over all frames; beyond
    it some pairs would be counted at a shorter image distance.
    """
    vectors = _unitcell_vectors_A(trajectory)
    volumes = np.abs(np.linalg.det(vectors))
    widths = [volumes / np.linalg.norm(np.cross(vectors[:, i], vectors[:, j]), axis=1)
              for i, j in ((1, 2), (2, 0), (0, 1))]
    return 0.5 * float(np.min(widths))


def radial_distribution(trajectory: mdtraj.Trajectory, pair: tuple[str, str], *,
                        r_max_A: float | None = None, bin_width_A: float = 0.05,
                        frames=None) -> RadialDistribution:
    """Partial RDF g_AB(r) of element pair ``pair`` (e.g. ``("O", "H")``), using MDTraj.

    ``r_max_A`` defaults to :func:`max_rdf_radius_A`; a larger value is refused. The
    histogram runs from 0 to ``r_max_A`` in bins of ``bin_width_A`` Å. ``frames``
    (indices or a slice) selects the frames averaged over; default all.
    """
    if bin_width_A <= 0:
        raise ValueError(f"bin_width_A must be positive, got {bin_width_A}")
    if frames is not None:
        trajectory = trajectory[frames]
    if trajectory.n_frames == 0:
        raise ValueError("radial_distribution needs at least one frame")
    limit_A = max_rdf_radius_A(trajectory)
    if r_max_A is None:
        r_max_A = limit_A
    if not 0 < r_max_A <= limit_A * (1 + 1e-9):
        raise ValueError(f"r_max_A={r_max_A} must lie in (0, {limit_A:.4g}] Å: beyond half the "
                         "smallest cell width minimum-image distances are incomplete")
    symbols = np.array([atom.element.symbol for atom in trajectory.topology.atoms])
    first, second = (np.flatnonzero(symbols == element) for element in pair)
    for element, indices in zip(pair, (first, second), strict=True):
        if len(indices) == 0:
            raise ValueError(f"no atoms of element {element!r} in the trajectory")
    if pair[0] == pair[1] and len(first) < 2:
        raise ValueError(f"an {pair[0]}-{pair[0]} RDF needs at least two {pair[0]} atoms")
    atom_pairs = trajectory.topology.select_pairs(first, second)
    n_bins = max(1, int(round(r_max_A / bin_width_A)))
    r_range_nm = np.array([0.0, r_max_A / NM_TO_A])

    # MDTraj normalises each call by len(pairs)·Σ_frames 1/V, so chunks combine
    # exactly when weighted by their own Σ 1/V.
    inverse_volumes = 1.0 / trajectory.unitcell_volumes
    chunk = max(1, _MAX_DISTANCES_PER_CHUNK // len(atom_pairs))
    weighted_g = np.zeros(n_bins)
    for start in range(0, trajectory.n_frames, chunk):
        stop = min(start + chunk, trajectory.n_frames)
        r_nm, g = mdtraj.compute_rdf(trajectory[start:stop], atom_pairs, r_range=r_range_nm,
                                     n_bins=n_bins, periodic=True)
        weighted_g += g * inverse_volumes[start:stop].sum()
    g = weighted_g / inverse_volumes.sum()

    n_partners = len(second) - 1 if pair[0] == pair[1] else len(second)
    mean_inverse_volume_A3 = float(inverse_volumes.mean()) / NM_TO_A**3
    return RadialDistribution(pair=tuple(pair), r_A=r_nm * NM_TO_A, g=g,
                              partner_density_per_A3=n_partners * mean_inverse_volume_A3)


def coordination_number(rdf: RadialDistribution, r_cut_A: float) -> float:
    """Mean number of B atoms within ``r_cut_A`` Å of an A atom: ∫₀^rc 4πr² ρ_B g_AB(r) dr.

    The integral is the histogram sum over bins whose centre is below ``r_cut_A``.
    """
    if not rdf.r_A[0] <= r_cut_A:
        raise ValueError(f"r_cut_A={r_cut_A} is below the first bin centre {rdf.r_A[0]:.4g} Å")
    bin_width = rdf.r_A[1] - rdf.r_A[0] if len(rdf.r_A) > 1 else 2 * rdf.r_A[0]
    inner = rdf.r_A - bin_width / 2
    outer = rdf.r_A + bin_width / 2
    shell_volumes = 4.0 / 3.0 * np.pi * (outer**3 - inner**3)
    inside = rdf.r_A < r_cut_A
    return float(rdf.partner_density_per_A3 * np.sum(rdf.g[inside] * shell_volumes[inside]))


def first_peak(rdf: RadialDistribution,
               window_A: tuple[float, float] | None = None) -> tuple[float, float]:
    """Position (Å) and height of the first peak of g(r), to sub-bin precision.

    The first peak is the first local maximum of the binned g (g[i−1] ≤ g[i] > g[i+1])
    at least half as high as the highest bin, so that small ripples at the foot of the
    peak are passed over; for a liquid's like-pair RDF (O–O in water: 2.8 Å, g ≈ 3) it
    is the highest peak. ``window_A = (low, high)`` looks only at the bins whose centres
    lie in it, for a peak behind a higher one (the first intermolecular O–H peak of
    water, behind the bond's). The peak is refined by the vertex of the parabola through
    that bin and its two neighbours, fitted to ln g where all three are positive (exact
    for a Gaussian peak) and to g otherwise. Needs uniform bins; raises ``ValueError``
    when the maximum lies on the first or last bin searched (no peak inside the range).
    """
    r_A, g = np.asarray(rdf.r_A, dtype=float), np.asarray(rdf.g, dtype=float)
    if window_A is not None:
        inside = (r_A >= window_A[0]) & (r_A <= window_A[1])
        r_A, g = r_A[inside], g[inside]
    if len(g) < 3 or not np.max(g) > 0:
        raise ValueError("g(r) needs at least 3 bins and a positive value to have a peak")
    middle = g[1:-1]
    candidates = np.flatnonzero((middle >= g[:-2]) & (middle > g[2:])
                                & (middle >= 0.5 * np.max(g))) + 1
    if len(candidates) == 0:
        low, high = (0.0, r_A[-1]) if window_A is None else window_A
        raise ValueError(f"g({rdf.pair[0]}–{rdf.pair[1]}) has its maximum at the edge of "
                         f"{low:.3g}–{high:.3g} Å: no peak inside the range")
    top = candidates[0]
    values = g[top - 1:top + 2]
    logarithmic = bool(np.all(values > 0))
    below, centre, above = np.log(values) if logarithmic else values
    # Negative for a local maximum, which also puts the vertex within half a bin.
    curvature = below - 2.0 * centre + above
    offset = 0.5 * (below - above) / curvature
    vertex = centre - 0.25 * (below - above) * offset
    height = np.exp(vertex) if logarithmic else vertex
    return float(r_A[top] + offset * (r_A[1] - r_A[0])), float(height)


def _unitcell_vectors_A(trajectory: mdtraj.Trajectory) -> np.ndarray:
    if trajectory.unitcell_vectors is None:
        raise ValueError("an RDF needs a periodic cell: the trajectory has no unit cell")
    return trajectory.unitcell_vectors.astype(float) * NM_TO_A
