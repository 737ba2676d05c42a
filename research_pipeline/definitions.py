"""The research_pipeline code location: everything under `defs/` is loaded automatically.

Project-wide policy applied here: every asset carries a code reference to the file and line of
its definition (the catalog's "Source" link), so the UI leads from an asset to its code.
"""

from pathlib import Path

import dagster as dg
from dagster._record import copy


def _with_code_references(loaded: dg.Definitions) -> dg.Definitions:
    """`loaded` with a code reference on every asset."""
    # A module that imports an asset re-exports the same object: keep each once before wrapping it.
    assets = list({id(a): a for a in loaded.assets or []}.values())
    return copy(loaded, assets=dg.with_source_code_references(assets))


defs = _with_code_references(dg.load_from_defs_folder(path_within_project=Path(__file__).parent))
