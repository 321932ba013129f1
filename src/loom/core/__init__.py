"""Loom's core layer: building blocks shared by the features; it imports nothing above it."""
