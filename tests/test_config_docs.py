"""The configuration reference in docs/ is generated from the config model and must be current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_configuration_reference_matches_the_config_model():
    # Prepare / Execute: the generator's --check compares what it would write with the file.
    result = subprocess.run(
        [sys.executable, "scripts/gen_config_docs.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr


def test_reference_lists_every_config_key_with_its_default():
    from pfi_rag.config import Config

    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for section, field in Config.model_fields.items():
        model = field.annotation
        keys = [f"{section}.{name}" for name in getattr(model, "model_fields", {})] or [section]
        for key in keys:
            assert f"| `{key}` |" in text, key
    assert "| `privacy.epsilon_max` | float | `8.0` | > 0 |" in text
