"""``voxdiff data check``: an integrity report of a data set.

For every case: is the image readable, 3D, finite, with positive spacing; does the label have the
image's shape and affine; are its values inside the label schema; which organs are present; the
spacing, orientation and HU range. Problems make the report fail (exit code 2 on the command line).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from voxdiff.core.errors import VoxdiffError

from .adapters import Dataset, open_dataset
from .ctcheck import ALLOW_FLAG, ct_problem, ct_warnings
from .preprocess import axcodes


@dataclass
class CaseCheck:
    case_id: str
    image_path: str
    label_path: str | None
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shape: list[int] | None = None
    spacing: list[float] | None = None
    axcodes: str | None = None
    hu_min: float | None = None
    hu_max: float | None = None
    labels: list[int] | None = None  # BTCV ids present (after mapping)


@dataclass
class CheckReport:
    root: str
    kind: str
    cases: list[CaseCheck]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why): not taken as CTs

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)

    @property
    def n_problems(self) -> int:
        return sum(not c.ok for c in self.cases)

    def to_dict(self) -> dict[str, Any]:
        from voxdiff.core.config import to_dict

        return {"root": self.root, "kind": self.kind, "ok": self.ok, "n_cases": len(self.cases),
                "n_problems": self.n_problems, "cases": [to_dict(c) for c in self.cases],
                "skipped": [{"path": p, "why": w} for p, w in self.skipped]}

    def table(self) -> str:
        rows = [("case", "shape", "spacing (mm)", "orient", "HU range", "labels", "status")]
        for c in self.cases:
            rows.append(
                (
                    c.case_id,
                    "x".join(map(str, c.shape)) if c.shape else "-",
                    "x".join(f"{s:.2f}" for s in c.spacing) if c.spacing else "-",
                    c.axcodes or "-",
                    f"{c.hu_min:.0f}..{c.hu_max:.0f}" if c.hu_min is not None else "-",
                    ("-" if c.label_path is None else (",".join(map(str, c.labels)) if c.labels else "none")) if c.labels is not None or c.label_path is None else "?",
                    "ok" if c.ok and not c.warnings else ("WARN: " + "; ".join(c.warnings) if c.ok else "PROBLEM: " + "; ".join(c.problems)),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(len(widths))) + "  " + r[-1] for r in rows]
        n = len(self.cases)
        summary = f"{n} case{'' if n == 1 else 's'} ({self.kind}) in {self.root}: " + (
            "all ok" if self.ok else f"{self.n_problems} with problems"
        )
        skipped = [f"skipped (not a CT): {p} ({w})" for p, w in self.skipped]
        return "\n".join(lines + skipped + [summary])


def _without_path(msg: str, path: str) -> str:
    """A warning about the case's own file, without the file name (the table names the case)."""
    p = str(path)
    return msg[len(p) + 2:] if msg.startswith(p + ": ") else msg


def check_case(ds: Dataset, ref, allow_non_ct: bool = False) -> CaseCheck:
    c = CaseCheck(ref.case_id, ref.image_path, ref.label_path)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            case = ds.load(ref)
        c.warnings.extend(_without_path(str(x.message), ref.image_path) for x in w)
    except VoxdiffError as e:
        c.ok = False
        c.problems.append(str(e))
        return c
    except Exception as e:  # anything unexpected is still a problem of this case, not a crash
        c.ok = False
        c.problems.append(f"{ref.image_path}: {e.__class__.__name__}: {e}")
        return c
    img = case.image
    c.shape = [int(s) for s in img.shape]
    c.spacing = [round(float(s), 4) for s in case.meta.spacing]
    c.axcodes = "".join(axcodes(case.meta.affine))
    c.hu_min, c.hu_max = float(img.min()), float(img.max())
    problem = ct_problem(img)
    if problem and not allow_non_ct:
        c.ok = False
        c.problems.append(f"{ref.image_path}: {problem}; if this is CT, pass {ALLOW_FLAG}")
    elif problem:
        c.warnings.append(f"{problem} (accepted: {ALLOW_FLAG})")
    c.warnings.extend(ct_warnings(img))
    if max(c.spacing) > 10:
        c.warnings.append(f"very coarse spacing {c.spacing}")
    if case.label is not None:
        vals = np.unique(case.label)
        c.labels = [int(v) for v in vals if v != 0]
        if not c.labels:
            c.warnings.append("label map is empty (background only)")
    return c


def check_dataset(path: str | os.PathLike, kind: str = "auto", split: str = "all", progress: bool = True,
                  allow_non_ct: bool = False) -> CheckReport:
    """Check every case of a data set; the data set must at least open (else InputError).

    An image that fails the shared CT check (:mod:`voxdiff.data.ctcheck`) is a problem of its case,
    unless ``allow_non_ct`` (then a warning). Series skipped by ``folder`` mode are listed in
    :attr:`CheckReport.skipped`."""
    from tqdm import tqdm

    ds = open_dataset(path, kind=kind, split=split)
    cases = [check_case(ds, r, allow_non_ct) for r in tqdm(ds.refs, desc="check", unit="case", disable=None if progress else True)]
    return CheckReport(str(Path(path)), ds.kind, cases, list(ds.skipped))
