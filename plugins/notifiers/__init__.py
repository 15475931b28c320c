"""notifiers of the VM migration engine."""
