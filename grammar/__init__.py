"""The TXCL grammar, shipped as package data (see txcl/parser.py)."""
