"""sandhop.datasets: trace schema and Parquet storage, real-suite recipes, the shipped data."""
