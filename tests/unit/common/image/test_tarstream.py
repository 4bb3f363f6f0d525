"""Regular members' data read from the source under tarfile's stream (common/image/tarstream.py `_DirectMember`)."""
from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

from common.image.filetree import Tree
from common.image.layers import ApplyState, Limits, apply_layer


def test_member_data_read_below_tarfile_is_every_byte_in_place(tmp_path: Path) -> None:
    """Sizes around the read-ahead pieces and tarfile's 10 KiB records, a GNU long name, and small files between
    big ones all come out whole, and the headers after them are found where tarfile expects them."""
    rng = random.Random(8)
    sizes = [0, 1, 511, 512, 513, 10239, 10240, 10241, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 << 20, 7, 2_500_000]
    files = {f"dir/{'long-' * 30 if i == 3 else ''}f{i}": rng.randbytes(n) for i, n in enumerate(sizes)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    tree = Tree()
    apply_layer(tree, buf, spool_dir=tmp_path, limits=Limits(), state=ApplyState())
    for name, data in files.items():
        node = tree.lookup(name.encode())
        assert node is not None and node.content is not None and node.content.size == len(data)
        with node.content.open() as f:
            assert f.read() == data, name
