"""Conversion pipeline steps: pull, build, measure, push, boot-check."""
