"""Benchmarks of the gateway against real peers (DCMTK storescp/storescu, Orthanc): `python -m bench.run`.

Not part of the installed package: it imports `gateway` (to read its index and time its delivery queue)
and `simulators` (data sets, process harness, PACS simulator). Results: bench/RESULTS.md.
"""
