"""The conformance suite: checks any backend against cpu_ref, op by op (see docs/conformance.md).

Entry points: `runner.run(backend, tier=..., dtypes=..., ops=..., fallback=...) -> report.Report` and the
`deepport conformance` command (cli.py). Cases live in cases/<op>.py, one file per op contract.
"""
