"""voxdiff.core.lazy: the stage packages import their modules on first use and give the same objects."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["voxdiff.bpr", "voxdiff.pretrain", "voxdiff.features", "voxdiff.probe", "voxdiff.evaluate", "voxdiff.segment"]


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_is_the_object_of_its_module(name):
    package = importlib.import_module(name)
    assert package.__all__, name
    for attr in package.__all__:
        value = getattr(package, attr)
        module = importlib.import_module(value.__module__) if hasattr(value, "__module__") and callable(value) else None
        if module is not None and hasattr(module, attr):  # a class or function: where it was defined
            assert getattr(module, attr) is value, (name, attr)
        assert attr in dir(package)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        package.no_such_name  # noqa: B018


def test_a_submodule_is_an_attribute_as_with_an_eager_package():
    import voxdiff.bpr as bpr

    assert bpr.models is importlib.import_module("voxdiff.bpr.models")


def test_importing_the_stage_packages_and_their_command_modules_loads_no_torch():
    # one interpreter: the imports first (no torch), then a name asked for loads its module (and torch with it)
    code = ("import sys, importlib; [importlib.import_module(m) for m in sys.argv[1:]]; print('torch' in sys.modules); "
            "from voxdiff.bpr import train_bpr; print(train_bpr.__module__, 'torch' in sys.modules)")
    mods = PACKAGES + [p + ".cli" for p in PACKAGES] + ["voxdiff.experiments.cli"]
    out = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True, check=True, timeout=120)
    assert [line.split() for line in out.stdout.strip().splitlines()[-2:]] == [["False"], ["voxdiff.bpr.train", "True"]]
