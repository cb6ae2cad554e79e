"""Converters between the canonical IA3 adapter and external adapter formats."""
