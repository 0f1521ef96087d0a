"""Every path, file format and database access of the project (no torch, no Prefect).
Importing it changes nothing: process-wide choices such as Arrow's allocator are made where a pipeline starts."""
