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
