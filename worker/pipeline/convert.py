"""One conversion end to end: pull → build → package → push, with stage reports and cancel points."""
from __future__ import annotations

import shutil

from worker.pipeline.host import ConversionHost
from worker.pipeline.spec import ConvertResult, ConvertSpec, Progress, Workspace
from worker.pipeline.stages import Packaged, build, keep, package, prepare, pull, push, result


def convert(spec: ConvertSpec, host: ConversionHost, progress: Progress, work: Workspace) -> ConvertResult:
    """Convert one image. Everything written goes under `work.scratch` (removed at the end) or the host's blob cache.

    With the host's boot check, the EIF is booted after it is measured and before anything is pushed; a boot
    that does not reach the entrypoint raises `BootCheckFailed` carrying the result in `details["boot_check"]`.
    Without one, the output layer is uploaded while it is compressed and the upload is committed only at push,
    after every check passed; a failed or cancelled conversion leaves nothing in the registry.
    """
    plan = prepare(spec, host, work)
    work.scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
    packaged: Packaged | None = None
    try:
        built = build(spec, host, progress, plan, pull(spec, host, progress, plan))
        packaged = package(spec, host, progress, plan, built)
        pushed = push(spec, host, progress, plan, packaged)
        keep(plan, built, packaged)
        progress.finished()
        return result(built, packaged, pushed)
    finally:
        if packaged is not None and packaged.stream is not None:
            packaged.stream.close()  # deletes an uncommitted upload session
        shutil.rmtree(work.scratch, ignore_errors=True)
