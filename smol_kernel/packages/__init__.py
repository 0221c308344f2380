"""Packages for kernels with no network: the host resolves and installs binary wheels
(``installer.py``) from requirements the guest names (``requirements.py``). See
docs/packages.md."""
