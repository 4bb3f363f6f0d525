"""Running enclaves without Nitro hardware: a vhost-user-vsock back-end for QEMU's `nitro-enclave` machine
(`python -m worker.emulator`) and `nitroconv run-local`."""
