"""Benchmarks as a library: what `tfjax bench ...` runs, usable from Python too.

Library, in reading order: `workload` (which requests, when, how long, read how fast) ->
`client` (the streaming OpenAI client that times every token) -> `metrics` (vLLM's latency
figures and the reader model's streaming figures) -> `run` (one run: counters scraped by
`scrape`, requests sent, metrics computed) -> `report` (table, JSON, CSV) and `plots`.
`server` starts and stops `tfjax serve` or any server command; `flags` holds the flags the
serving commands share; `floors` the physical floors of a step; `calibrate` derives the
paper's regime from measured capacity.

Commands, one module each with `main(argv)` (`cli` lists them): `serve`, `compare`
(+ `compare_report`), `engine` (modes `engine_tp`, `engine_xla_cpu`, `engine_pieces`),
`sim_paper` (mode `sim_sched`), `sim_vs_live`, `prefix`, `offload`, `mixed_lengths`, `soak`,
`gpu_check`.
Library modules never import command modules; a mode imports its command's module.
"""
