"""occscene-pl test suite.

A regular package, so that ``tests.fakes`` wins over stray top-level ``tests`` packages that some wheels install
(torch-fidelity 0.4 ships one).
"""
