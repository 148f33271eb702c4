"""Plumbing a first reading can skip: arrays on NumPy or CuPy (backend), counter-based random numbers (philox), the
compiled extension (native), data sets (data; their file formats in datafiles, folders of images in folder),
checkpoints and the models they hold (checkpoint), PNG grids (image), Ctrl-C (signals)."""
