"""Parallelism helpers: process groups and the launcher (``dist``), megatron-core CPU workarounds (``cpu``)."""
