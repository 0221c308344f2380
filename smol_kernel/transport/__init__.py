"""Byte streams from the host to guest vsock ports."""
