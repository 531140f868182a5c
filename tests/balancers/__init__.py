"""Unit tests of the balancers, one file per method (see tests/balancers/_properties.py)."""
