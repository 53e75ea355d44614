"""A finished run loaded back (`trained_run`) and the commands that use it: evaluate, predict,
attention, inspect."""
