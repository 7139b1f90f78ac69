"""A stand-in for SimpleITK, NOT the library: for scripts/gpu_bench.sh on a GPU machine
that has no SimpleITK (its 50 MiB wheel does not fit the 64 MiB the device tool carries).

nnunetv2 imports SimpleITK at module level in its reader registry, so it cannot be
imported without one; the benchmark's models read NIfTI with NibabelIO and pingu-dask
reads images with nibabel, so nothing calls SimpleITK. Anything that does gets an
ImportError that says so. gpu_bench.sh puts this folder on PYTHONPATH only when
`import SimpleITK` fails.
"""


def __getattr__(name: str):
    raise ImportError(
        f"SimpleITK.{name}: SimpleITK is not installed here; this is scripts/stubs/SimpleITK, "
        "a stand-in so that nnunetv2 imports (use a NibabelIO model)"
    )
