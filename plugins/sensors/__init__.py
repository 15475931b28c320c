"""sensors of the VM migration engine."""
