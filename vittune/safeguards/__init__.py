"""Safeguards against faults and hostile inputs that arrive from outside a run: a second
writer on a run folder, a full disk, duplicate or tampered files (docs/reliability.md)."""
