"""The Nitro Enclave image: EIF format, measurements, writer, reader, metadata and signature sections, the cpio
ramdisks, COSE signing, and how the enclave launches the program (launcher spec, exec shim)."""
