"""A small web shop served on loopback, with a Playwright test suite written for it (`tests/`):
the browser suite of the dataset. `python -m sandhop.datasets.webshop` serves it."""
