"""geb_jax/atomic_io.py: all-or-nothing writes whose results have the permissions `open` gives
(0666 / 0777 less the umask), whatever a writer used inside (mkstemp's and safetensors' 0600)."""
import json
import os
import stat
import tempfile

import numpy as np
import pytest
import safetensors.numpy

from geb_jax.atomic_io import atomic_file, atomic_folder, atomic_path, write_json_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_and_folders_get_the_permissions_open_gives(tmp_path, umask_022):
    with open(tmp_path / "reference", "w") as f:  # what a plain open() gives here
        f.write("x")
    expected = _mode(tmp_path / "reference")
    assert expected == 0o644
    with atomic_file(str(tmp_path / "a.bin")) as f:
        f.write(b"abc")
    write_json_atomic(str(tmp_path / "b.json"), {"k": 1})
    with atomic_path(str(tmp_path / "c.bin")) as tmp:
        fd, _ = tempfile.mkstemp(dir=tmp_path)  # writers that go through mkstemp leave 0600
        os.close(fd)
        os.chmod(tmp, 0o600)
    with atomic_folder(str(tmp_path / "folder")) as tmp:
        safetensors.numpy.save_file({"w": np.ones(3, np.float32)}, os.path.join(tmp, "m.st"))
        os.chmod(os.path.join(tmp, "m.st"), 0o600)
        os.makedirs(os.path.join(tmp, "sub"))
        os.chmod(os.path.join(tmp, "sub"), 0o700)
    for name in ("a.bin", "b.json", "c.bin", "folder/m.st"):
        assert _mode(tmp_path / name) == expected, name
    assert _mode(tmp_path / "folder") == _mode(tmp_path / "folder" / "sub") == 0o755
    assert json.loads((tmp_path / "b.json").read_text()) == {"k": 1}


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(str(target), {"old": True})
    with pytest.raises(RuntimeError):
        with atomic_file(str(target), "w") as f:
            f.write("half")
            raise RuntimeError("writer failed")
    with pytest.raises(TypeError):
        write_json_atomic(str(target), {"bad": object()})
    assert json.loads(target.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary left behind
