"""Fixtures shared by the unit and in-memory tests."""

import pytest

from relay.state import State, init_state


@pytest.fixture
def state(tmp_path):
    """A relay state dir with a CA and a server certificate for localhost."""
    init_state(tmp_path / "st", ["localhost"])
    return State(tmp_path / "st")
