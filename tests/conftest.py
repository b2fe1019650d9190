from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same RNG state; two intra-op threads like the reference runs."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
