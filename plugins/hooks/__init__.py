"""hooks of the VM migration engine."""
