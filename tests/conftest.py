from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import tiny`


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama + byte-level tokenizer folder, built once per session."""
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-model"))
