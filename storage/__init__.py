"""Every path, file format and database access of the project; importing it first also tunes Arrow's allocator.
Trade-off: the tuning is an environment default read once per process, so it only applies before pyarrow loads."""
import os

# Arrow's default memory pool is mimalloc, whose arenas are committed eagerly by default on Linux, as
# transparent huge pages: every 2 MB region touched is zeroed whole and zeroed again after each purge. Reading
# parquet, that zeroing was 17 % of a tokenize run's CPU; committing on demand cut it 13x and the run's wall
# time 11 % (benchmarks/RESULTS.md, 2026-12-01). setdefault: a user's own MIMALLOC_* setting wins.
os.environ.setdefault("MIMALLOC_ARENA_EAGER_COMMIT", "0")
