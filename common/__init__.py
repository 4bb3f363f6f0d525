"""Shared core: settings, formats (cpio, EIF), registry client, layer applier, errors. No Flask, no worker code."""
