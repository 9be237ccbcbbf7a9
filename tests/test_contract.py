"""The published contract: every event model of shared/ has a channel in the AsyncAPI document."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys

from pydantic import BaseModel

import shared
from shared.contract import CHANNELS
from tests.helpers import REPO


def _event_models() -> set[type]:
    """Every top-level event model: a pydantic model with a schema_version in a shared/*events module."""
    found = set()
    for info in pkgutil.iter_modules(shared.__path__):
        if info.name.endswith("events"):
            module = importlib.import_module(f"shared.{info.name}")
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if (issubclass(obj, BaseModel) and obj.__module__ == module.__name__
                        and "schema_version" in obj.model_fields and not obj.__name__.startswith("_")):
                    found.add(obj)
    return found


def test_asyncapi_document_lists_every_channel_with_its_schema():
    out = subprocess.run([sys.executable, "-m", "dicomflow", "asyncapi"], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"}).stdout
    doc = json.loads(out)
    assert doc["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in doc["channels"].values()}
    assert {ch.address for ch in CHANNELS} <= addresses
    schemas = doc["components"]["schemas"]
    for ch in CHANNELS:
        assert ch.model.__name__ in schemas
        assert set(ch.model.model_fields) <= set(schemas[ch.model.__name__]["properties"])


def test_every_event_model_is_in_the_contract():
    documented = {ch.model for ch in CHANNELS}
    missing = {m.__name__ for m in _event_models()} - {m.__name__ for m in documented}
    assert not missing, f"event models without a channel in shared/contract.py: {missing}"
