"""operators of the VM migration engine."""
