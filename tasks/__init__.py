"""Thin Prefect tasks: read by URI -> call phpn_core -> write by URI -> return a small record (never tensors)."""
