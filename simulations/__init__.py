"""Simulations of p2pull swarms on virtual time, driving the daemon's own scheduling core
(``p2pull.core``): a chunk-level engine, a fluid engine, scenarios as TOML files, and a
command line (``python -m simulations``). See simulations/README.md."""
