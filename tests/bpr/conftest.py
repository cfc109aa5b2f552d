import pytest


@pytest.fixture(scope="session")
def tiny_phantoms():
    """Preprocessed small phantoms at 6 mm: 6 unlabelled-style for training, 3 labelled for testing."""
    from voxdiff.data.phantom.generator import PhantomConfig, generate_phantom
    from voxdiff.data.preprocess import PreprocessConfig, preprocess

    cfg = PhantomConfig(shape=(64, 64, 48))
    pp = PreprocessConfig(spacing=(6.0, 6.0, 6.0))
    train = [preprocess(generate_phantom(100 + s, cfg, unlabelled=True), pp) for s in range(6)]
    test = [preprocess(generate_phantom(900 + s, cfg), pp) for s in range(3)]
    return train, test


@pytest.fixture(scope="session")
def tiny_slice_model(tmp_path_factory, tiny_phantoms):
    """``get(context=0, step=1, fill="repeat") -> (config, folder)``: a slice model trained 300 steps
    on ``tiny_phantoms`` by the tiny recipe with those neighbouring slices, trained once per test
    process and shared (read only) by the tests that need one. Tests that use it carry
    ``xdist_group("tiny_slice")`` so that pytest-xdist runs them in the same process."""
    from voxdiff.bpr import BPRTrainConfig, train_bpr
    from voxdiff.core.config import from_dict

    made: dict = {}

    def get(context: int = 0, step: int = 1, fill: str = "repeat"):
        key = (context, step, fill)
        if key not in made:
            cfg = from_dict(BPRTrainConfig, dict(
                kind="slice", steps=300, slice_patch=24, slices_per_sample=8, lr=3e-3, slice_context=context,
                slice_context_step=step, slice_context_fill=fill, spacing=(6.0, 6.0, 6.0), channels=(8, 16, 16, 16),
                batch_size=4, checkpoint_every=1000, seed=0))
            out = tmp_path_factory.mktemp("tiny_slice") / "m"
            train_bpr(cfg, out, cases=tiny_phantoms[0], progress=False)
            made[key] = (cfg, out)
        return made[key]

    return get
