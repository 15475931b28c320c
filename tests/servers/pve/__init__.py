"""A Proxmox VE API server for tests (Proxmox itself cannot run here): every request checked against the official
schema (``../shared/pve-api/apidata.js``), real state, disk bytes reached over a real sshd."""
