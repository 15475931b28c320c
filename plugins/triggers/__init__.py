"""triggers of the VM migration engine."""
