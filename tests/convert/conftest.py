"""Each test starts from, and leaves behind, an empty gin configuration."""

import gin
import pytest


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()
