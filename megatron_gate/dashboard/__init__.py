"""Live stability dashboard over the monitor's JSONL (`megatron-gate dashboard RUN_DIR ...`).

Data flow: `reader` tails each run's `stability.jsonl` (skipping bad lines, counted) ->
`store` keeps the records as columns -> `downsample` reduces a step range to what a screen
can show -> `server` answers the page's JSON requests and serves the page itself, `export`
writes the same page as one self-contained HTML file.
"""
