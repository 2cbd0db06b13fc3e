"""The offline demo: the whole pipeline on the bundled demo model and dataset (``model/``, ``data/``)."""
