import os

# Must be set before any @triton.jit kernel runs, or Triton finds "0 active drivers" on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    """A tiny random Wan pipeline saved in the diffusers layout (shared by the session)."""
    from vidtune.testing import build_tiny_wan_pipeline_dir

    return build_tiny_wan_pipeline_dir(tmp_path_factory.mktemp("tiny_wan") / "model")


@pytest.fixture(scope="session")
def tiny_sana_dir(tmp_path_factory):
    """A tiny random Sana Video pipeline saved in the diffusers layout (shared by the session)."""
    from vidtune.testing import build_tiny_sana_pipeline_dir

    return build_tiny_sana_pipeline_dir(tmp_path_factory.mktemp("tiny_sana") / "model")
