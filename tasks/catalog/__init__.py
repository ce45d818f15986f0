"""The collection's task lists as data, and their parsed form (`entries()`)."""

from moe_jax_tasks.catalog.catalog import (  # noqa: F401
    COT_TSV, EXPECTED_COUNTS, MIXTURES, NIV2_JSON, P3, TFDS, UNRELEASED,
    CatalogEntry, cot_dataset, entries, names)
