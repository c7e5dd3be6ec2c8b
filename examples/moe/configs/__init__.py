"""Configurations of the MoE example: `default` (CPU demo) and `gpu`."""
