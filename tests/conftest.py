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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real public data beside the checkout (`../shared/data`): Alpaca, MUSE, XQuAD, PAWS-X, …"""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set EASYLM_ALIGN_SHARED_DATA")
    return SHARED_DATA
