"""Copy of sandhop for traced children."""
