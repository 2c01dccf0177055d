import pytest

from vidtune.testing import build_tiny_wan_pipeline_dir


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    """A tiny random Wan pipeline saved in the diffusers layout (shared by the session)."""
    return build_tiny_wan_pipeline_dir(tmp_path_factory.mktemp("tiny_wan") / "model")

