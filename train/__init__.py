"""The trainer: everything with devices, files and time. Imports optim_jax, never the reverse."""
