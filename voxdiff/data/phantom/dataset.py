"""Write a phantom data set in nnU-Net layout (+ an unlabelled folder for pretraining)."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ...core.config import to_dict, write_config
from ...core.errors import InputError
from ...core.outputs import atomic_write_json, staged_dir
from ..labels import dataset_json_labels
from .generator import GENERATOR_VERSION, PhantomConfig, generate_phantom

SETS = ("train", "test", "unlabelled")


def case_seed(seed: int, set_name: str, index: int) -> int:
    """Deterministic 63-bit seed of case ``index`` of ``set_name`` in a data set with ``seed``."""
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=(SETS.index(set_name), int(index)))
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def case_plan(n_train: int, n_test: int, n_unlabelled: int, seed: int) -> list[dict[str, Any]]:
    """(set, case id, seed) of every case; the three sets use disjoint seeds."""
    plan = []
    for set_name, n, fmt in (("train", n_train, "phantom_{:03d}"), ("test", n_test, "phantom_{:03d}"), ("unlabelled", n_unlabelled, "phantom_u{:04d}")):
        for i in range(n):
            idx = i + (n_train if set_name == "test" else 0)
            plan.append({"set": set_name, "case_id": fmt.format(idx), "seed": case_seed(seed, set_name, i)})
    seeds = [p["seed"] for p in plan]
    if len(set(seeds)) != len(seeds):  # astronomically unlikely; never write overlapping sets
        raise RuntimeError("phantom case seeds collide; choose another --seed")
    return plan


# the header description of every phantom image, and the name in a phantom data set's dataset.json:
# how a segmenter fitted on phantoms tells a phantom from a real CT (voxdiff.segment)
PHANTOM_DESCRIPTION = "voxdiff synthetic phantom"
PHANTOM_DATASET_NAME = "voxdiff_phantoms"


def is_phantom_image(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a phantom image written by :func:`make_phantom_dataset` (a NIfTI file whose
    header description says so); False for anything else, DICOM folders and unreadable files included."""
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        return False
    try:
        raw = np.asarray(nib.load(str(p)).header["descrip"]).item()
        text = raw.split(b"\0", 1)[0].decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    except Exception:  # not a NIfTI file nibabel reads: not a phantom
        return False
    return text.strip() == PHANTOM_DESCRIPTION


def is_phantom_dataset(path: str | os.PathLike) -> bool:
    """Whether the data set folder ``path`` was written by :func:`make_phantom_dataset` (its
    ``dataset.json`` names it)."""
    import json

    f = Path(path) / "dataset.json"
    try:
        return json.loads(f.read_text()).get("name") == PHANTOM_DATASET_NAME
    except (OSError, ValueError, AttributeError):
        return False


def training_data_record(data_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """What a segmenter bundle records of its training data (``meta``): ``{"training_data":
    "phantoms"}`` for a phantom data set folder, or for ``None`` (phantoms generated for the run);
    empty for any other data."""
    return {"training_data": "phantoms"} if data_dir is None or is_phantom_dataset(data_dir) else {}


def fitted_on_phantoms(meta: dict[str, Any] | None) -> bool:
    """Whether a bundle's ``meta`` says it was fitted on phantoms only (:func:`training_data_record`)."""
    return (meta or {}).get("training_data") == "phantoms"


def _write_case(out: str, item: dict[str, Any], cfg: PhantomConfig, preview: bool = False) -> dict[str, Any]:
    """Generate and write one planned case; with ``preview`` also its ``preview.png`` (the dataset's,
    drawn from the case in hand rather than generated again)."""
    from ..io import save_nifti

    root = Path(out)
    unl = item["set"] == "unlabelled"
    case = generate_phantom(item["seed"], cfg, unlabelled=unl, case_id=item["case_id"])
    cid = item["case_id"]
    if item["set"] == "train":
        img_p, lab_p = root / "imagesTr" / f"{cid}_0000.nii.gz", root / "labelsTr" / f"{cid}.nii.gz"
    elif item["set"] == "test":
        img_p, lab_p = root / "imagesTs" / f"{cid}_0000.nii.gz", root / "labelsTs" / f"{cid}.nii.gz"
    else:
        img_p, lab_p = root / "unlabelled" / f"{cid}.nii.gz", None
    save_nifti(img_p, case.image, case.meta.affine, dtype=np.int16, description=PHANTOM_DESCRIPTION)
    if lab_p is not None:
        save_nifti(lab_p, case.label, case.meta.affine, dtype=np.uint8)
    info = {"set": item["set"], "seed": item["seed"], "image": str(img_p.relative_to(root)),
            "label": None if lab_p is None else str(lab_p.relative_to(root)), **case.meta.extra}
    if preview:
        from .preview import preview_png

        preview_png(case, root / "preview.png")
    return info


def make_phantom_dataset(
    out: str | os.PathLike,
    n_train: int = 10,
    n_test: int = 5,
    n_unlabelled: int = 20,
    seed: int = 0,
    cfg: PhantomConfig | None = None,
    force: bool = False,
    workers: int = 1,
    preview: bool = True,
    progress: bool = True,
    train_site: dict[str, Any] | None = None,
) -> Path:
    """Generate ``n_train`` + ``n_test`` labelled and ``n_unlabelled`` image-only phantoms into ``out``.

    Layout: ``dataset.json``, ``imagesTr/<case>_0000.nii.gz`` + ``labelsTr/<case>.nii.gz``,
    ``imagesTs``/``labelsTs`` (held-out), ``unlabelled/<case>.nii.gz``, ``phantoms.json`` (per-case
    subject parameters, landmarks, organ volumes), ``config.yaml`` and ``preview.png``. The folder
    appears only when everything was written; an existing non-empty ``out`` is refused unless
    ``force``.

    ``train_site``: :class:`PhantomConfig` overrides for the labelled training cases only (e.g.
    ``{"phases": ["portal_venous"], "z_modes": ["abdomen"]}``): a shifted regime where the labels
    come from one acquisition setting while test and unlabelled cases span every setting.
    """
    import dataclasses

    from tqdm import tqdm

    cfg = cfg or PhantomConfig()
    train_cfg = cfg
    if train_site:
        unknown = sorted(set(train_site) - set(PhantomConfig.__dataclass_fields__))
        if unknown:
            raise InputError(None, f"train_site: unknown phantom settings {', '.join(unknown)}")
        train_cfg = dataclasses.replace(cfg, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in train_site.items()})
    for name, n in (("n_train", n_train), ("n_test", n_test), ("n_unlabelled", n_unlabelled)):
        if int(n) < 0:
            raise InputError(None, f"{name} must be >= 0, got {n}")
    if int(seed) < 0:
        raise InputError(None, f"seed must be >= 0, got {seed}")
    if n_train + n_test + n_unlabelled == 0:
        raise InputError(out, "nothing to generate (n_train + n_test + n_unlabelled = 0)")
    plan = case_plan(n_train, n_test, n_unlabelled, seed)
    with staged_dir(out, force=force) as tmp:
        for d in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if n_test else ()) + (("unlabelled",) if n_unlabelled else ()):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        infos: dict[str, Any] = {}
        # the preview shows the first labelled case (the first case when there is none) as the dataset's
        # config draws it: drawn from the written case, unless a train_site drew that case with other
        # settings (then it is generated once more, after the loop)
        first = next((it for it in plan if it["set"] != "unlabelled"), plan[0])
        first_as_is = first["set"] != "train" or train_cfg is cfg

        def args(it: dict[str, Any]) -> tuple:
            shown = bool(preview) and it is first and first_as_is
            return str(tmp), it, train_cfg if it["set"] == "train" else cfg, shown

        bar = tqdm(total=len(plan), desc="phantoms", unit="case", disable=not progress)
        try:
            if workers and workers > 1:
                with ProcessPoolExecutor(max_workers=int(workers)) as ex:
                    futs = [(it, ex.submit(_write_case, *args(it))) for it in plan]
                    for it, fu in futs:
                        infos[it["case_id"]] = fu.result()
                        bar.update(1)
            else:
                for it in plan:
                    infos[it["case_id"]] = _write_case(*args(it))
                    bar.update(1)
        finally:
            bar.close()
        dj = {
            "name": PHANTOM_DATASET_NAME,
            "description": (
                "Synthetic abdominal CT phantoms from the voxdiff procedural generator: trunk anatomy in mm "
                "(skin, fat, muscle, spine, ribs, pelvis, lungs, heart, bowel, 13 BTCV organs), random body "
                "size, organ shape/position, smooth deformation, contrast phase, noise, blur, spacing and "
                "scanned z-range. Images int16 HU, labels uint8 BTCV ids."
            ),
            "reference": "voxdiff.data.phantom",
            "licence": "CC0-1.0 (synthetic data)",
            "tensorImageSize": "3D",
            "channel_names": {"0": "CT"},
            "labels": dataset_json_labels(),
            "numTraining": int(n_train),
            "numTest": int(n_test),
            "numUnlabelled": int(n_unlabelled),
            "file_ending": ".nii.gz",
            "voxdiff_phantom": {
                "generator_version": GENERATOR_VERSION,
                "seed": int(seed),
                "config": to_dict(cfg),
                "train_site": dict(train_site or {}),
                "cases": {cid: {"set": i["set"], "seed": i["seed"]} for cid, i in infos.items()},
            },
        }
        atomic_write_json(tmp / "dataset.json", dj)
        atomic_write_json(tmp / "phantoms.json", infos)
        write_config(tmp / "config.yaml", cfg, extra={"dataset": {"n_train": n_train, "n_test": n_test, "n_unlabelled": n_unlabelled, "seed": seed,
                                            "train_site": dict(train_site or {})}})
        if preview and not first_as_is:
            from .preview import preview_png

            case = generate_phantom(first["seed"], cfg, unlabelled=first["set"] == "unlabelled", case_id=first["case_id"])
            preview_png(case, tmp / "preview.png")
    return Path(out)
