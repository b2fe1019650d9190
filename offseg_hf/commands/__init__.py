"""Sub-commands of the ``offseg`` command line (see :mod:`offseg_hf.cli`)."""
