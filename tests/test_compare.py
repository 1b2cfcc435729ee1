"""The comparison CLI end to end on small generated run files, and its errors."""

import csv
import json
import sys

import h5py
import mdtraj
import numpy as np
import pytest
import torch
from matplotlib.image import imread
from scipy import stats
from scipy.signal import lfilter

from mace_lpcalc.analysis import (diffusion_coefficient, energy_drift,
                                  evaluate_static_deviations, load_run,
                                  mean_squared_displacement, timeseries_average)
from mace_lpcalc.calculator import LowPrecisionMACECalculator
from mace_lpcalc.analysis.compare import format_estimate, main
from mace_lpcalc.analysis.report import production_start_frame
from mace_lpcalc.analysis.statistics import equilibration_start
from tiny_models import build_tiny_model
from mace_lpcalc.systems import water_box
from mace_lpcalc.md.frames import Frame
from mace_lpcalc.md.trajectory import TrajectoryError, TrajectoryWriter

N_FRAMES, DT_PS, STEPS_PER_FRAME = 120, 0.01, 10


def write_run(path, *, policy, seed, temperature_K=300.0, wall_time_s=0.02, n_molecules=16,
              protocol="npt"):
    """A run file in the mace_lpcalc layout with random-walk atoms and AR(1) series."""
    rng = np.random.default_rng(seed + 100 * len(policy))
    atoms = water_box(n_molecules, seed=0)
    n_atoms = len(atoms)

    def ar1(scale):
        return lfilter([1], [1, -0.7], rng.normal(0, scale, N_FRAMES))

    positions = atoms.positions + np.cumsum(rng.normal(0, 0.05, (N_FRAMES, n_atoms, 3)), axis=0)
    temperature = temperature_K + ar1(3.0)
    potential = -4.0 * n_atoms + ar1(0.05)
    kinetic = 1.5 * n_atoms * 8.617e-5 * temperature
    conserved = potential + kinetic + 1e-4 * np.arange(N_FRAMES)
    scale = 1 + ar1(0.001)  # NPT-like box fluctuations: density varies
    wall = wall_time_s * (1 + np.abs(ar1(0.05)))
    metadata = {"protocol": protocol, "policy": policy, "backend": "e3nn", "seed": seed,
                "model_hash": "0" * 64, "settings": {"timestep_fs": 1.0},
                "versions": {"mace_lpcalc": "test"}}
    with TrajectoryWriter.create(path, atoms, metadata) as writer:
        for i in range(N_FRAMES):
            writer.append(Frame(
                step=i * STEPS_PER_FRAME, time_ps=i * DT_PS, positions_A=positions[i],
                potential_energy_eV=potential[i], kinetic_energy_eV=kinetic[i],
                conserved_energy_eV=conserved[i], temperature_K=temperature[i],
                wall_time_per_step_s=np.nan if i == 0 else wall[i],
                cell_A=np.array(atoms.cell) * scale[i], stress_eV_A3=rng.normal(0, 1e-4, 6)))
    return path


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def row(rows, metric, group, key="group"):
    matches = [r for r in rows if r["metric"] == metric and r[key] == group]
    assert len(matches) == 1, (metric, group)
    return matches[0]


def production_start(run):
    """The CLI's default: the later equilibration start of potential energy and density."""
    return max(equilibration_start(run.series["potential_energy"]),
               equilibration_start(run.series["density"]))


def production_values(path):
    run = load_run(path)
    start = production_start(run)
    assert start == production_start_frame(run)
    s = slice(start, None)
    oxygen = [i for i, symbol in enumerate(run.symbols) if symbol == "O"]
    diffusion = diffusion_coefficient(run.time_ps[s], run.positions_A[s], run.masses_amu, oxygen)
    return {
        "Temperature": timeseries_average(run.series["temperature"][s]),
        "Density": timeseries_average(run.series["density"][s]),
        "Potential energy": timeseries_average(run.series["potential_energy"][s] / run.n_atoms),
        "Energy drift": energy_drift(run.time_ps[s], run.series["conserved_energy"][s],
                                     run.n_atoms),
        "D(O)": (diffusion.diffusion_1e5_cm2_s, diffusion.stderr_1e5_cm2_s),
        "wall": timeseries_average(run.series["wall_time_per_step"][s]),
        "run": run,
        "start": start,
    }


def test_compare_two_runs_writes_tables_matching_direct_calculation(tmp_path, capsys):
    reference = write_run(tmp_path / "fp64.h5", policy="fp64", seed=0)
    test = write_run(tmp_path / "bf16.h5", policy="fp32-linear-bf16", seed=0, temperature_K=302.0,
                     wall_time_s=0.005)
    out_dir = tmp_path / "out"
    assert main([str(test), "--reference", str(reference), "--out-dir", str(out_dir)]) == 0
    printed = capsys.readouterr().out

    expected = {"fp64": production_values(reference),
                "fp32-linear-bf16": production_values(test)}
    summary = read_csv(out_dir / "summary.csv")
    for group, values in expected.items():
        for metric in ("Temperature", "Density", "Potential energy"):
            entry = row(summary, metric, group)
            assert float(entry["mean"]) == pytest.approx(values[metric].mean, rel=1e-12)
            assert float(entry["stderr"]) == pytest.approx(values[metric].stderr, rel=1e-12)
            assert entry["n_runs"] == "1" and entry["error_kind"] == "run"
        drift = row(summary, "Energy drift", group)
        assert (float(drift["mean"]), float(drift["stderr"])) == pytest.approx(
            values["Energy drift"], rel=1e-10)
        diffusion = row(summary, "D(O)", group)
        assert (float(diffusion["mean"]), float(diffusion["stderr"])) == pytest.approx(
            values["D(O)"], rel=1e-10)
        wall = values["wall"]
        assert float(row(summary, "Throughput", group)["mean"]) == pytest.approx(
            86400 / wall.mean / 1e6, rel=1e-12)
        assert float(row(summary, "Wall time", group)["mean"]) == pytest.approx(
            (N_FRAMES - 1) * STEPS_PER_FRAME * wall.mean / 3600, rel=1e-12)
        # The MSD row is the windowed MSD at half the shortest production length.
        run, start = values["run"], values["start"]
        oxygen = [i for i, symbol in enumerate(run.symbols) if symbol == "O"]
        lag, msd = mean_squared_displacement(run.time_ps[start:], run.positions_A[start:],
                                             run.masses_amu, oxygen)
        latest = max(v["start"] for v in expected.values())
        half = (N_FRAMES - latest - 1) * DT_PS / 2
        assert float(row(summary, f"MSD(O) at {half:.4g} ps", group)["mean"]) == \
            pytest.approx(np.interp(half, lag, msd), rel=1e-9)
    speedup = row(summary, "Speedup vs fp64", "fp32-linear-bf16")
    assert float(speedup["mean"]) == pytest.approx(
        expected["fp64"]["wall"].mean / expected["fp32-linear-bf16"]["wall"].mean, rel=1e-12)

    differences = read_csv(out_dir / "differences.csv")
    t64, t16 = expected["fp64"]["Temperature"], expected["fp32-linear-bf16"]["Temperature"]
    entry = row(differences, "Temperature", "fp32-linear-bf16")
    delta, stderr = t16.mean - t64.mean, np.hypot(t16.stderr, t64.stderr)
    assert entry["test"] == "z" and entry["reference"] == "fp64"
    assert float(entry["delta"]) == pytest.approx(delta, rel=1e-12)
    assert float(entry["stderr"]) == pytest.approx(stderr, rel=1e-12)
    assert float(entry["p_value"]) == pytest.approx(2 * stats.norm.sf(abs(delta / stderr)))
    assert float(entry["relative_percent"]) == pytest.approx(100 * delta / t64.mean)
    # One run per group: the MSD has no error, so no statistic and no p-value.
    msd = row(differences, f"MSD(O) at {half:.4g} ps", "fp32-linear-bf16")
    assert msd["stderr"] == "nan" and msd["p_value"] == "" and msd["statistic"] == ""

    markdown = (out_dir / "summary.md").read_text(encoding="utf-8")
    assert markdown == printed.rstrip("\n") + "\n"
    assert format_estimate(t64.mean, t64.stderr) in markdown
    assert format_estimate(t16.mean, t16.stderr) in markdown
    assert "## Equivalence vs fp64" in markdown and "p<" not in markdown
    # A single run's g(r) peak has no error: no interval, the verdict says what is missing.
    assert ("| fp32-linear-bf16 | g O–O first peak height | % |" in markdown
            and "undefined — needs ≥ 2 runs" in markdown)
    # The temperature row: a z interval from the two runs' own errors (normal quantile).
    relative, relative_stderr = 100 * delta / t64.mean, 100 * stderr / t64.mean
    half_width = stats.norm.ppf(0.95) * relative_stderr
    assert (f"| fp32-linear-bf16 | Temperature | % | {relative:+.3g} | "
            f"[{relative - half_width:+.3g}, {relative + half_width:+.3g}] | ±0.5 | "
            f"{half_width:.2g} |") in markdown
    for name in ("thermo.png", "rdf.png", "msd.png"):
        image = imread(out_dir / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert np.ptp(image[..., :3]) > 0.5  # something is drawn


def test_seed_averages_use_welch_t_between_policies(tmp_path):
    paths = [write_run(tmp_path / f"{policy}_{seed}.h5", policy=policy, seed=seed,
                       temperature_K=300.0 if policy == "fp64" else 310.0)
             for policy in ("fp64", "fp32") for seed in (0, 1)]
    out_dir = tmp_path / "out"
    assert main([*map(str, paths), "--out-dir", str(out_dir)]) == 0
    means = {policy: [production_values(tmp_path / f"{policy}_{seed}.h5")["Temperature"].mean
                      for seed in (0, 1)]
             for policy in ("fp64", "fp32")}
    summary = row(read_csv(out_dir / "summary.csv"), "Temperature", "fp32")
    assert (summary["n_runs"], summary["error_kind"]) == ("2", "seeds")
    assert float(summary["mean"]) == pytest.approx(np.mean(means["fp32"]), rel=1e-12)
    assert float(summary["stderr"]) == pytest.approx(np.std(means["fp32"], ddof=1) / np.sqrt(2))
    entry = row(read_csv(out_dir / "differences.csv"), "Temperature", "fp32")
    welch = stats.ttest_ind(means["fp32"], means["fp64"], equal_var=False)
    assert entry["test"] == "welch_t"
    assert float(entry["p_value"]) == pytest.approx(welch.pvalue)
    assert float(entry["dof"]) == pytest.approx(welch.df)
    assert float(entry["delta"]) == pytest.approx(10.0, abs=5.0)

    # certificate.json: the TOST of the temperature from the Welch interval over seeds.
    certificate = json.loads((out_dir / "certificate.json").read_text(encoding="utf-8"))
    assert certificate["reference"] == "fp64" and list(certificate["policies"]) == ["fp32"]
    temperature = certificate["policies"]["fp32"]["temperature"]
    assert set(temperature) == {"difference", "ci90_low", "ci90_high", "margin", "verdict",
                                "aggregate_ps", "n_replicas"}
    reference_mean = np.mean(means["fp64"])
    difference = 100 * (np.mean(means["fp32"]) - reference_mean) / reference_mean
    half_width = stats.t.ppf(0.95, welch.df) * 100 * float(entry["stderr"]) / reference_mean
    assert temperature["difference"] == pytest.approx(difference, rel=1e-9)
    assert (temperature["ci90_low"], temperature["ci90_high"]) == pytest.approx(
        (difference - half_width, difference + half_width), rel=1e-9)
    assert temperature["margin"] == 0.5 and temperature["n_replicas"] == 2
    # 10 K in 300 K is 3 %, far beyond ±0.5 %.
    assert temperature["verdict"] == "different"
    production_ps = [(N_FRAMES - 1 - production_values(tmp_path / f"fp32_{seed}.h5")["start"])
                     * DT_PS for seed in (0, 1)]
    assert temperature["aggregate_ps"] == pytest.approx(sum(production_ps))
    assert certificate["units"]["temperature"] == "%"
    assert certificate["units"]["potential_energy"] == "meV/atom"
    # The drift test needs a third policy: fp32 is its reference.
    assert "energy_drift" not in certificate["policies"]["fp32"]


def test_margins_from_toml_override_the_defaults_and_unknown_keys_are_refused(tmp_path,
                                                                                capsys):
    paths = [str(write_run(tmp_path / f"{policy}.h5", policy=policy, seed=0,
                           temperature_K=300.0 if policy == "fp64" else 310.0))
             for policy in ("fp64", "fp32")]
    margins = tmp_path / "margins.toml"
    margins.write_text("[equivalence]\ntemperature_percent = 50\n", encoding="utf-8")
    out_dir = tmp_path / "out"
    assert main([*paths, "--out-dir", str(out_dir), "--margins", str(margins)]) == 0
    certificate = json.loads((out_dir / "certificate.json").read_text(encoding="utf-8"))
    temperature = certificate["policies"]["fp32"]["temperature"]
    assert temperature["margin"] == 50.0 and temperature["verdict"] == "equivalent"
    assert certificate["margins"]["temperature_percent"] == 50.0
    assert certificate["policies"]["fp32"]["density"]["margin"] == 0.5  # the default
    capsys.readouterr()

    margins.write_text("[equivalence]\ndensity_pct = 1.0\n", encoding="utf-8")
    assert main([*paths, "--out-dir", str(tmp_path / "bad"), "--margins", str(margins)]) == 2
    assert "unknown margin 'density_pct'" in capsys.readouterr().err
    margins.write_text("[equivalence]\ndiffusion_percent = -5\n", encoding="utf-8")
    assert main([*paths, "--out-dir", str(tmp_path / "bad"), "--margins", str(margins)]) == 2
    assert "'diffusion_percent' must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_nvt_runs_report_no_energy_drift(tmp_path):
    paths = [str(write_run(tmp_path / f"{policy}.h5", policy=policy, seed=0, protocol="nvt"))
             for policy in ("fp64", "fp32", "fp32-linear-bf16")]
    out_dir = tmp_path / "out"
    assert main([*paths, "--out-dir", str(out_dir)]) == 0
    metrics = {r["metric"] for r in read_csv(out_dir / "summary.csv")}
    assert "Temperature" in metrics and "Energy drift" not in metrics
    certificate = json.loads((out_dir / "certificate.json").read_text(encoding="utf-8"))
    assert all("energy_drift" not in rows for rows in certificate["policies"].values())
    markdown = (out_dir / "summary.md").read_text(encoding="utf-8")
    assert "Energy drift" not in markdown and "No energy drift for nvt runs" in markdown


def test_missing_and_foreign_files_are_refused(tmp_path, capsys):
    good = write_run(tmp_path / "good.h5", policy="fp64", seed=0)
    assert main([str(tmp_path / "absent.h5")]) == 2
    assert "not found" in capsys.readouterr().err

    text = tmp_path / "notes.h5"
    text.write_text("not a trajectory")
    assert main([str(good), str(text)]) == 2
    assert "not an HDF5 file" in capsys.readouterr().err

    plain = tmp_path / "plain.h5"
    mdtraj.load(str(good)).save_hdf5(str(plain))  # valid MDTraj HDF5 without our layout
    assert main([str(plain)]) == 2
    assert "not a mace_lpcalc trajectory" in capsys.readouterr().err

    smaller = write_run(tmp_path / "small.h5", policy="fp32", seed=0, n_molecules=8)
    assert main([str(good), str(smaller)]) == 2
    assert "not comparable" in capsys.readouterr().err
    assert not (tmp_path / "comparison").exists()


def test_series_in_unexpected_units_are_refused(tmp_path):
    path = write_run(tmp_path / "run.h5", policy="fp64", seed=0)
    with h5py.File(path, "a") as handle:
        handle["temperature"].attrs["units"] = "celsius"
    with pytest.raises(TrajectoryError, match="'temperature' is in 'celsius', expected 'K'"):
        load_run(path)


def test_runs_load_without_pytables_as_mdtraj_load_gives_them(tmp_path, monkeypatch):
    # mdtraj.load reads HDF5 through PyTables, which the GPU machines lack; the comparison
    # (in a campaign, on the GPU machine) must not need it.
    path = write_run(tmp_path / "run.h5", policy="fp64", seed=0, n_molecules=8)
    expected = mdtraj.load(str(path))
    monkeypatch.setitem(sys.modules, "tables", None)  # import tables now fails
    with pytest.raises(ImportError):
        mdtraj.load(str(path))
    run = load_run(path)
    for name in ("xyz", "time", "unitcell_lengths", "unitcell_angles"):
        np.testing.assert_array_equal(getattr(run.trajectory, name), getattr(expected, name))
        assert getattr(run.trajectory, name).dtype == getattr(expected, name).dtype
    assert run.trajectory.topology == expected.topology
    assert [(residue.name, residue.resSeq) for residue in run.trajectory.topology.residues] \
        == [(residue.name, residue.resSeq) for residue in expected.topology.residues]
    assert main([str(path), "--out-dir", str(tmp_path / "out")]) == 0


def test_static_deviations_from_the_cli_match_direct_evaluation(tmp_path, capsys):
    model_path = tmp_path / "tiny.model"
    torch.save(build_tiny_model(), model_path)
    run_path = write_run(tmp_path / "fp32.h5", policy="fp32", seed=0, n_molecules=8)
    out_dir = tmp_path / "out"
    # A missing model is reported, and the tables and plots already made are kept.
    assert main([str(run_path), "--out-dir", str(out_dir), "--static-deviations",
                 "--model", str(tmp_path / "absent.model")]) == 2
    assert "model file not found" in capsys.readouterr().err
    assert (out_dir / "summary.csv").is_file() and (out_dir / "msd.png").is_file()

    assert main([str(run_path), "--out-dir", str(out_dir), "--static-deviations",
                 "--model", str(model_path), "--max-frames", "3"]) == 0
    rows = {r["metric"]: r for r in read_csv(out_dir / "static_deviations.csv")}
    assert rows["AE_E"]["group"] == "fp32" and rows["AE_E"]["n_structures"] == "3"

    run = load_run(run_path)
    frames = [run.to_atoms(i)
              for i in np.linspace(production_start(run), N_FRAMES - 1, 3).round().astype(int)]
    direct = evaluate_static_deviations(
        frames,
        LowPrecisionMACECalculator(model_paths=str(model_path), policy="fp64", backend="e3nn"),
        LowPrecisionMACECalculator(model_paths=str(model_path), policy="fp32", backend="e3nn"))
    for label, (mean, p95) in direct.summary().items():
        assert float(rows[label]["mean"]) == pytest.approx(mean, rel=1e-9, abs=1e-15)
        assert float(rows[label]["p95"]) == pytest.approx(p95, rel=1e-9, abs=1e-15)
    # FP32 against FP64: small but not zero.
    assert 0 < float(rows["AE_E"]["mean"]) < 1e-5
    assert 0 < float(rows["RAE_F"]["mean"]) < 1e-4
    assert float(rows["cos_F"]["mean"]) > 1 - 1e-8
