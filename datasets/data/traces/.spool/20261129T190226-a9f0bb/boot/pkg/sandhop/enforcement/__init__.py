"""Copy of sandhop.enforcement for traced children."""
