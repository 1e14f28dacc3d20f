"""Objectives turn a batch into a summed loss and the number of tokens it covers."""
