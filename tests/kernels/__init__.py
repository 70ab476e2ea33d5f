"""Tests of the kernel package ``braintrace_kernels`` (the top-level ``kernels/`` folder).

This folder is a package so that its modules (``test_dense.py`` beside ``tests/test_dense.py``) get
distinct import names under pytest's default import mode.
"""
