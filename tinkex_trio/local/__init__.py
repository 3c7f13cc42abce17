"""The local Tinker-compatible backend (install the `local` extra)."""
