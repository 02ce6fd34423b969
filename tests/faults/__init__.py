"""Fault injection: killed processes, transient failures, concurrency, a full disk, bad input.

See ``docs/reliability.md`` for the table of faults and their observed outcomes. Everything
here runs on a CPU with a tiny random ViT and small images; subprocesses run with one
OpenMP thread (see ``helpers.ENV``).
"""
