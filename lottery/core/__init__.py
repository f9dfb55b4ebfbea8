"""Core helpers every layer may use: registries and the settings check, durations in steps, seeds, atomic files and
checkpoints, stop signals, divergence checks, the device. Imports nothing else of lottery."""
