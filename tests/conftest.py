"""Shared test fixtures.

Eight host devices are emulated on the CPU (a TPUv3-8-sized mesh); this must be set before JAX
is imported anywhere in the test session.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EASYLM_ALIGN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
TEST_DATA = REPO_ROOT / "tests" / "data"


def skip_without_cpu_kernels(choice: str = "cpu_fused") -> None:
    """Skips the calling test, with the reason, when `choice` (an attention backend or loss kernel)
    is `cpu_fused` and the C++ CPU kernels cannot be built here."""
    if choice != "cpu_fused":
        return
    from easylm_align.model.kernels import native  # imported late: JAX must see the XLA_FLAGS above first

    reason = native.unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The large real data beside the checkout (`../shared/data`): full Alpaca, MUSE, XQuAD, ….

    A clone on its own lacks it; the tests that need it are skipped then, with the reason in
    pytest's summary (`-ra`), so that the rest of the suite still runs.
    """
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"needs the large shared data: {SHARED_DATA} not found "
            "(put it at ../shared/data beside the checkout or set EASYLM_ALIGN_SHARED_DATA)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def test_data() -> Path:
    """Small real fixtures shipped in the repository (`tests/data/`, sources in its README)."""
    return TEST_DATA
