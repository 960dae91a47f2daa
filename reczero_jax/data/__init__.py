"""Rating datasets -> leak-free Think-before-Recommendation samples (``samples`` has the record
format) -> TFDS array_record splits -> grain batches.

    from reczero_jax.data import load_split
    for rec in load_split(DIR, "test"):   # sample dicts, see reczero_jax.data.samples
        ...
"""

from reczero_jax.data.tfds_builder import load_split

__all__ = ["load_split"]
