"""Benchmarks as a library: what `tfjax bench ...` runs, usable from Python too.

Reading order: `workload` (which requests, when, how long, read how fast) -> `client` (the
streaming OpenAI client that times every token) -> `metrics` (vLLM's latency figures and the
reader model's streaming figures) -> `report` (table, JSON, CSV) and `plots`. `server` starts and
stops `tfjax serve` (or any server command) for the commands that need their own servers;
`flags` holds the flags the serving commands share. Each command is one module with
`add_parser(subparsers)`: `serve`, `compare`, `engine`, `sim`, ... (`cli` lists them).
No module here imports a command module, so there are no import cycles.
"""
