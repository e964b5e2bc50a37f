"""The storage floor: files written atomically, runs and their metrics, run bundles.

    files.py         the one atomic writer (temp file, fsync, rename); append for files that only grow
    liveness.py      is the process behind a run or a job still alive: pid + start time
    runs.py          run records, metrics, listing, reading and writing runs, load_updates
    base_weights.py  W0 from a .safetensors file, a model folder, or a hub id at a recorded revision
    bundles.py       one run as a zip, exported and imported (validated first, never unpickled)

Nothing in this package imports from the floors above it (training, analyses, plots, dashboard): reading
a stored run never trains, downloads or rebuilds a model. Submodules are imported explicitly
(``from lora_analysis.store.files import atomic_write_text``); this ``__init__`` imports nothing, so the
LoRA core can use :mod:`.files` without pulling in the run store. ``lora_analysis.runstore`` gathers the
run store's names under their first home.
"""
