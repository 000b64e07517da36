"""QM9 (Ramakrishnan et al., Scientific Data 2014): 12 quantum-chemical properties of 130,831 molecules.

The many-task regression regime of the multi-task literature (Navon et al., ICML 2022; Liu et al.,
NeurIPS 2023). The molecules come from the ``qm9pack`` package's CSV files (read directly: its
``get_data()`` imports ``pkg_resources``, which current setuptools no longer ships). A graph
network is outside polytask's encoders, so each molecule is described by a fixed-length vector:
the eigenvalues of its Coulomb matrix (Rupp et al., Physical Review Letters 2012), sorted by
magnitude and zero-padded to the largest molecule (29 atoms), followed by its counts of H, C, N,
O and F atoms. Computing them for all molecules takes seconds; they are cached on disk, keyed by
the SHA-256 of the four CSV files, so later loads only read the cache.

The twelve targets and their columns follow the qm9pack files; ``alpha`` is the files' isotropic
polarizability, which the loader checks against the tensor in ``qm9_polarizability.csv`` (merged
on ``XYZ_file``: every molecule must have one).

Departures
----------
Distances are in Ångström rather than bohr (Rupp et al. use atomic units): this scales the
off-diagonal Coulomb terms by a constant, which the standardisation of the features removes up
to the interplay with the diagonal. The descriptor is not a graph network's input: the numbers a
multi-task paper reports for QM9 with message passing (Navon et al., ICML 2022) are not comparable.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from polytask.core.errors import DataError
from polytask.core.task import Task
from polytask.data.dataset import MultiOutputDataset
from polytask.datasets.base import DATASETS, LoadedData, PackagedFile, select_tasks, split_indices
from polytask.datasets.download import cache_dir

_BASE = "https://raw.githubusercontent.com/raghurama123/qm9pack/main/qm9pack/data/"
_INSTALL = "pip install --no-deps qm9pack"
PART_FILES = (
    PackagedFile("qm9pack", "data/qm9_part1.csv", _BASE + "qm9_part1.csv",
                 "19f0a5d595462d52cd82eef3370f3e9eb55a1f52cb14985657200349568deff3", _INSTALL),
    PackagedFile("qm9pack", "data/qm9_part2.csv", _BASE + "qm9_part2.csv",
                 "2bca113fdc0b28a13563c80ed9b240e934f3da6c64c64fe74ddb4f0f36036e61", _INSTALL),
    PackagedFile("qm9pack", "data/qm9_part3.csv", _BASE + "qm9_part3.csv",
                 "9c5efb5733d2af149db8d95d36ff198b4ffed12d9f7b344220a1e5877d5c6a43", _INSTALL),
)
POLARIZABILITY_FILE = PackagedFile("qm9pack", "data/qm9_polarizability.csv", _BASE + "qm9_polarizability.csv",
                                   "1729ebca7da76850ca1091c050933901c84b90edb30d06f34df1ebd47789d23a", _INSTALL)

#: task name → column of the CSV files (units as in the files: Debye, bohr³, Hartree, bohr², cal/mol/K)
TARGETS = {
    "mu": "Dipole_debye", "alpha": "Polarizability_bohr3", "homo": "HOMO_au", "lumo": "LUMO_au",
    "gap": "HOMO_LUMO_gap_au", "r2": "R2_bohr2", "zpve": "ZPVE_au", "u0": "InternalEnergy_0K_au",
    "u": "InternalEnergy_298K_au", "h": "Enthalphy_298K_au", "g": "GibbsFreeEnergy_298K_au",
    "cv": "Heatcapacity_Cv_cal_mol_K",
}
AVAILABLE = {name: Task(name, kind="regression") for name in TARGETS}
ELEMENTS = ("H", "C", "N", "O", "F")
CHARGES = {"H": 1.0, "C": 6.0, "N": 7.0, "O": 8.0, "F": 9.0}
MAX_ATOMS = 29
#: bump when the descriptor changes, so that an old cache is never read as the new one
DESCRIPTOR_VERSION = 1


def coulomb_eigenvalues(charges: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Sorted Coulomb-matrix eigenvalues of padded molecules (Rupp et al., PRL 2012).

    ``charges``: (n, A) nuclear charges, 0 for padding; ``positions``: (n, A, 3) in Ångström.
    C_ii = ½ Z_i^2.4, C_ij = Z_i Z_j / |R_i − R_j| (Ångström rather than bohr: a constant factor
    on the off-diagonal terms, harmless once the features are standardised). Padding atoms give
    zero rows and columns, hence zero eigenvalues. Returns (n, A), each row sorted by decreasing
    magnitude.
    """
    z = torch.from_numpy(charges.astype(np.float64))
    r = torch.from_numpy(positions.astype(np.float64))
    distance = torch.cdist(r, r)
    off = z[:, :, None] * z[:, None, :] / distance.where(distance > 0, torch.ones_like(distance))
    eye = torch.eye(z.shape[1], dtype=torch.bool)
    matrix = torch.where(eye, 0.5 * z[:, :, None] ** 2.4, off)
    real = (z[:, :, None] > 0) & (z[:, None, :] > 0)
    values = torch.linalg.eigvalsh(matrix * real)
    order = values.abs().argsort(dim=1, descending=True)
    return values.gather(1, order).numpy()


def _read_molecules(download: bool) -> tuple[pd.DataFrame, list[Path]]:
    paths = [f.path(download) for f in PART_FILES]
    columns = ["XYZ_file", "Elements", "XYZ_Ang", *TARGETS.values()]
    try:
        frame = pd.concat([pd.read_csv(p, usecols=columns) for p in paths], ignore_index=True)
        polar_path = POLARIZABILITY_FILE.path(download)
        polar = pd.read_csv(polar_path, usecols=["XYZ_file", "A_xx", "A_yy", "A_zz"])
    except ValueError as exc:  # a column renamed in another qm9pack version
        raise DataError(f"the qm9pack CSV files do not have the expected columns ({exc}); "
                        f"expected qm9pack 1.0.3: `{_INSTALL}==1.0.3`") from None
    merged = frame.merge(polar, on="XYZ_file", how="inner", validate="one_to_one")
    if len(merged) != len(frame):
        raise DataError(f"qm9pack: {len(frame) - len(merged)} molecules have no row in qm9_polarizability.csv; "
                        f"expected every molecule there: reinstall with `{_INSTALL}==1.0.3`")
    trace = (merged["A_xx"] + merged["A_yy"] + merged["A_zz"]) / 3
    off = (trace - merged[TARGETS["alpha"]]).abs()
    if (off > 0.01).any():  # the files round to 0.001 bohr³; a larger gap means mismatched rows
        row = int(off.to_numpy().argmax())
        raise DataError(f"qm9pack: molecule {merged['XYZ_file'].iloc[row]} has polarizability "
                        f"{merged[TARGETS['alpha']].iloc[row]} but its tensor's trace / 3 is {trace.iloc[row]:.3f}; "
                        f"expected them equal: reinstall with `{_INSTALL}==1.0.3`")
    return merged, [*paths, polar_path]


def _checksum(paths: list[Path]) -> str:
    digest = hashlib.sha256(f"descriptor-v{DESCRIPTOR_VERSION}".encode())
    for path in paths:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _numbers(text: str) -> np.ndarray:
    try:
        return np.array(text.replace("[", "").replace("]", "").split(","), dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"qm9pack XYZ_Ang value {text[:60]!r}…: expected a nested list of numbers ({exc})") from None


def _compute(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    n = len(frame)
    charges = np.zeros((n, MAX_ATOMS))
    positions = np.zeros((n, MAX_ATOMS, 3))
    counts = np.zeros((n, len(ELEMENTS)))
    for row, (elements, xyz) in enumerate(zip(frame["Elements"], frame["XYZ_Ang"])):
        atoms = json.loads(elements.replace("'", '"'))
        coords = _numbers(xyz).reshape(-1, 3)  # "0." and "1." are floats to Python, not to JSON
        if len(atoms) != len(coords) or len(atoms) > MAX_ATOMS or any(a not in CHARGES for a in atoms):
            raise DataError(f"qm9pack row {row} ({frame['XYZ_file'].iloc[row]}): expected up to {MAX_ATOMS} atoms of "
                            f"{'/'.join(ELEMENTS)} with one position each; found {len(atoms)} elements {atoms[:5]}… and "
                            f"{len(coords)} positions")
        charges[row, :len(atoms)] = [CHARGES[a] for a in atoms]
        positions[row, :len(atoms)] = coords
        for atom in atoms:
            counts[row, ELEMENTS.index(atom)] += 1
    features = np.concatenate([coulomb_eigenvalues(charges, positions), counts], axis=1).astype(np.float32)
    targets = frame[list(TARGETS.values())].to_numpy(dtype=np.float64)
    return features, targets


def descriptors(download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(features (130831, 34) float32, targets (130831, 12) float64), from the disk cache when it is there."""
    paths = [f.path(download) for f in (*PART_FILES, POLARIZABILITY_FILE)]
    cached = cache_dir() / f"qm9_descriptors_{_checksum(paths)}.npz"
    if cached.exists():
        with np.load(cached) as stored:
            return stored["features"], stored["targets"]
    frame, _ = _read_molecules(download)
    features, targets = _compute(frame)
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=".qm9_descriptors.", suffix=".npz")
    try:  # written aside and renamed, so a killed process never leaves half a cache behind
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, features=features, targets=targets)
        os.replace(tmp, cached)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return features, targets


@DATASETS.register("qm9")
def load_qm9(*, tasks: list[str] | None = None, seed: int = 0, val_fraction: float = 0.1,
             test_fraction: float = 0.1, rows: int | None = None, download: bool = True) -> LoadedData:
    """QM9, 130,831 molecules, 12 regression targets (Ramakrishnan et al., Scientific Data 2014).

    Tasks (units of the files): ``mu`` dipole moment (D), ``alpha`` isotropic polarizability
    (bohr³), ``homo``, ``lumo``, ``gap`` (Hartree), ``r2`` electronic spatial extent (bohr²),
    ``zpve`` (Hartree), ``u0``, ``u``, ``h``, ``g`` internal energy at 0 K and 298 K, enthalpy and
    free energy at 298 K (Hartree), ``cv`` heat capacity (cal/mol/K). Targets are left in these
    units: the config standardises them on the training rows (``tasks.NAME.standardize``).

    Features (34): 29 Coulomb-matrix eigenvalues sorted by magnitude, then the H/C/N/O/F atom
    counts, standardised on the training rows. ``rows`` keeps a seeded random subset of the
    molecules (the bench suites use 20,000). Split: seeded random, ``val_fraction`` /
    ``test_fraction`` of the rows.
    """
    features, targets = descriptors(download)
    chosen = select_tasks(AVAILABLE, tasks, list(TARGETS), "qm9")
    if rows is not None:
        if not isinstance(rows, int) or isinstance(rows, bool) or not 100 <= rows <= len(features):
            raise DataError(f"`rows` of dataset 'qm9' must be an int in [100, {len(features)}]; found {rows!r}")
        pick = np.sort(np.random.default_rng(seed).choice(len(features), rows, replace=False))
        features, targets = features[pick], targets[pick]
    train_idx, val_idx, test_idx = split_indices(len(features), (val_fraction, test_fraction), seed, source="qm9")
    train_rows = features[train_idx.numpy()]
    mean, std = train_rows.mean(axis=0), train_rows.std(axis=0)
    x = torch.from_numpy(((features - mean) / np.where(std > 0, std, 1.0)).astype(np.float32))
    columns = list(TARGETS)
    full = MultiOutputDataset(x, {t.name: torch.from_numpy(targets[:, columns.index(t.name)].astype(np.float32))
                                  for t in chosen})
    return LoadedData(
        name="qm9", tasks=chosen, train=full.subset(train_idx), val=full.subset(val_idx), test=full.subset(test_idx),
        encoder={"name": "mlp", "in_features": x.shape[1], "hidden": [256, 128]},
        description="QM9 molecules: 12 quantum-chemical properties (regression) from Coulomb-matrix eigenvalues",
    )
