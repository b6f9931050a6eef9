"""Files of spndi_dask: the output layout (paths, atomic writes), source readers (HDF5, TIFF),
file hashing, the raw and results Zarr stores, the direct shard reader and the output lock."""
