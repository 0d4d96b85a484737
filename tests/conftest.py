import pytest

import pyrestkv


@pytest.fixture(scope="session")
def model_path():
    return pyrestkv.default_model_path()
