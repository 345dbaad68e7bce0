"""A 200 MB instance is stored without the node holding it in memory.

A `libra-node run --no-worker` process receives one uncompressed instance of 200 MB of
pixel data from dcmsend. Its peak resident set size may grow by less than half the
instance, which fails as soon as anything (header parse, duplicate check, hashing) reads
the pixel data into memory even once. `bench/large_instance_memory.py` prints the figures.
"""

from __future__ import annotations

import pydicom
import pytest

from bench.large_instance_memory import measure_large_instance

INSTANCE_BYTES = 200_000_000


@pytest.mark.peers
def test_large_instance_peak_memory_bounded(tmp_path):
    measurement = measure_large_instance(tmp_path, INSTANCE_BYTES)
    stored = [path for path in (tmp_path / "node" / "store").rglob("*.dcm") if ".incoming" not in path.parts]
    assert len(stored) == 1
    # Pixel data stays on disk (deferred) while its length is read.
    stored_dataset = pydicom.dcmread(stored[0], defer_size=1024)
    pixel_data = stored_dataset.get_item(0x7FE00010, keep_deferred=True)
    assert pixel_data.length == stored_dataset.Rows * stored_dataset.Columns * 2
    assert pixel_data.length > 0.99 * INSTANCE_BYTES
    assert measurement.peak_was_reset, "/proc/PID/clear_refs is not writable, so the peak includes start-up"
    assert measurement.peak_growth_mib < measurement.instance_mib / 2, measurement
