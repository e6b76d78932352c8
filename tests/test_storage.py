import subprocess
import sys
import textwrap

import pytest

from pfi_rag.storage import atomic_directory, atomic_write_json, read_json, recover_directory


def test_atomic_json_round_trip_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    atomic_write_json(tmp_path / "x.json", {"a": 2})
    assert read_json(tmp_path / "x.json") == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_failed_directory_swap_keeps_the_old_directory(tmp_path):
    target = tmp_path / "cache"
    with atomic_directory(target) as staging:
        (staging / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "weights").write_text("half")
            raise RuntimeError("conversion died")
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_sigkill_during_a_directory_write_leaves_no_half_directory(tmp_path):
    target = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pfi_rag.storage import atomic_directory
        with atomic_directory({str(target)!r}) as staging:
            (staging / "weights").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], check=False)
    assert result.returncode == -9
    recover_directory(target)
    assert not target.exists()  # a reader never sees the half-written directory


def test_recover_restores_a_swap_interrupted_between_renames(tmp_path):
    target = tmp_path / "cache"
    old = tmp_path / "cache.old-123"
    old.mkdir()
    (old / "weights").write_text("v1")
    recover_directory(target)
    assert (target / "weights").read_text() == "v1"
