"""Shared fixtures: tiny in-process models, the shared data folder, the real SmolLM2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from tiny import tiny_model, tiny_tokenizer  # noqa: E402

#: The nightly-flow harness (``night``, ``tiny_folder``, ``tracking_uri``) for every test that runs a night.
pytest_plugins = ("nights",)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}: shared benchmark data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_fetch():
    """The real SmolLM2-135M, fetched once into the models cache (``data/models`` unless
    NAS_TEST_MODELS says otherwise); later sessions find it there and skip the download."""
    from flows.assets.fetch import fetch_model

    cache = Path(os.environ.get("NAS_TEST_MODELS", REPO / "data" / "models"))
    return fetch_model("smollm2-135m", cache, show_progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_fetch):
    """(model, tokenizer) of the real SmolLM2-135M."""
    from flows.assets.load import load_model

    return load_model(smollm2_fetch.path)


@pytest.fixture(scope="session")
def prefect(tmp_path_factory):
    """One Prefect test harness (a temporary API and database) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    # Generous start-up timeout: the server starts in 6-13 s on an idle 2-core CI machine, longer under load.
    with prefect_test_harness(server_startup_timeout=180):
        yield
