from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_configure(config):
    config.addinivalue_line("markers", "torch_threads(n): intra-op threads for the test (default 2)")


@pytest.fixture(autouse=True)
def _seed_and_threads(request):
    """Every test starts from the same RNG state and with two intra-op threads like the reference runs;
    modules of small tensors mark ``pytestmark = pytest.mark.torch_threads(1)`` (less OpenMP overhead and
    contention on a shared 2-core machine)."""
    marker = request.node.get_closest_marker("torch_threads")
    torch.manual_seed(0)
    torch.set_num_threads(marker.args[0] if marker else 2)
    yield


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
