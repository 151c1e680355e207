"""Stage one: tokens -> model forward passes -> normalized activations in a sharded Zarr store."""
