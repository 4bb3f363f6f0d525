# QEMU device set of the emulator: the nitro-enclave machine and what it selects (microvm,
# virtio-mmio, vhost-user-vsock, virtio-nsm, the ISA serial console), nothing else.
CONFIG_NITRO_ENCLAVE=y
