"""Static reference data shipped with mtl_tune (published result tables: :mod:`mtl_tune.data.published`)."""
