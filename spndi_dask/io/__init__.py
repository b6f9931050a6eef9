"""Readers for raw detector files and the Zarr stores of spndi_dask."""
