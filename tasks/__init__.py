"""Data steps: one verb per module, each a plain function that Prefect tasks wrap thinly.
Trade-off: `storage` is imported first so its allocator default is set before any step loads pyarrow."""
import storage  # noqa: F401
