"""The "Python (smolvm)" kernelspec template (installed by ``smol-kernel install``)."""
