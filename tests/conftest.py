"""Fixtures shared by every test folder.

``VOXDIFF_TEST_DEVICE=cuda`` (or ``cuda:N``) makes the tests that take the ``test_device`` fixture
(marked ``device``: backbone, pretraining, features) run their models there; the default is the CPU.
``pytest -m device`` runs just those (``benchmarks/gpu_check.sh --tests`` does it on a GPU machine).
"""

import os

import pytest

from voxdiff.core.runtime import tune_allocator

# The allocator setting the CLI applies for a user (``voxdiff.cli.main``), applied before torch loads:
# the tests that call the library's functions directly then run as a user's command does, without a
# fresh mmap and page faults for each large buffer. VOXDIFF_NO_MALLOPT=1 turns it off here too.
tune_allocator()

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core: one intra-op thread each, or the workers'
    # thread pools fight over the same cores.
    torch.set_num_threads(1)


def _memoise_phantoms(maxsize: int = 32) -> None:
    """Phantoms are a fifth of the suite's CPU, and many tests draw the same seeds: each test process
    keeps its last ``maxsize`` phantoms and hands out deep copies (a test may write into its case).
    The key is everything the generator reads (seed, the whole config, ``unlabelled``); ``case_id``
    only names the copy. The generator itself stays reachable as ``generate_phantom.__wrapped__``,
    for the tests of its determinism."""
    import copy
    import functools
    from collections import OrderedDict

    import voxdiff.data.phantom as package
    from voxdiff.data.phantom import dataset, generator

    original = generator.generate_phantom
    kept: OrderedDict = OrderedDict()

    @functools.wraps(original)
    def generate_phantom(seed, cfg=None, *, unlabelled=False, case_id=None):
        key = (int(seed), repr(cfg or generator.PhantomConfig()), bool(unlabelled))
        if key in kept:
            kept.move_to_end(key)
        else:
            kept[key] = original(seed, cfg, unlabelled=unlabelled)
            if len(kept) > maxsize:
                kept.popitem(last=False)
        case = copy.deepcopy(kept[key])
        case.meta.case_id = case_id or case.meta.case_id
        return case

    for module in (generator, dataset, package):
        module.generate_phantom = generate_phantom


_memoise_phantoms()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Keep ``--dist loadgroup``'s groups (``make test``): pytest-xdist marks a test of
    ``xdist_group("g")`` by appending ``@g`` to its node id through ``item._nodeid``, which pytest 9
    no longer reads (the id lives in ``item._id``), so every group was spread over the workers. Where
    that happened, the suffix is added here; where xdist's own works, nothing changes."""
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # an older pytest, where xdist's own suffix works
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(names)
        old = getattr(item, "_id", None)
        if names and not item.nodeid.endswith(suffix) and isinstance(old, NodeId) and old.names:
            # the suffix after the last name and its parameters, as one name: the same string whichever
            # way pytest rebuilds it (a report rebuilds it from the parts)
            last = old.names[-1] + (f"[{old.params}]" if old.params is not None else "") + suffix
            item._id = NodeId(path=old.path, names=(*old.names[:-1], last))


@pytest.fixture
def one_thread():
    """Tiny nets: one intra-op thread is as fast as two, and far faster on a busy shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def test_device() -> torch.device:
    """The device of the device tests: ``VOXDIFF_TEST_DEVICE`` (default cpu). Asking for CUDA where
    there is none fails these tests rather than quietly testing the CPU again."""
    from voxdiff.core.errors import InputError
    from voxdiff.core.runtime import resolve_device

    name = os.environ.get("VOXDIFF_TEST_DEVICE", "cpu")
    try:
        dev = resolve_device(name)
    except InputError as e:
        pytest.fail(f"VOXDIFF_TEST_DEVICE={name}: {e}", pytrace=False)
    if dev.type == "cuda":  # exact fp32 comparisons: no TF32 in the device tests
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return dev


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """``(folder, result, printed)``: ``voxdiff demo`` run once per test process at the tiny budget
    (``run_demo``), with what it printed. Read only: a test that resumes or changes it works on a copy.
    Tests that use it carry ``xdist_group("tiny_demo")`` (one process runs them)."""
    import contextlib
    import io

    from voxdiff.experiments.demo import run_demo

    out = tmp_path_factory.mktemp("tiny_demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        res = run_demo(out, budget="tiny")
    return out, res, printed.getvalue()
