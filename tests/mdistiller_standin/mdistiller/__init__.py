"""Test stand-in for upstream mdistiller (see ../README.md)."""
