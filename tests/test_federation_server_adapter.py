"""The ServerApp writes the global adapter from numpy arrays, so its process needs no torch.

The launcher saves the fresh adapter once as a template; the server writes each round's adapter
as that template's files with new weights. What it writes must load in PEFT as the weights given."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from pfi_rag.config import Config
from pfi_rag.federation.global_adapter import WEIGHTS, AdapterFiles, write_template
from pfi_rag.federation.task import fresh_adapter, read_adapter_arrays
from pfi_rag.models.adapters import read_adapter_info


def test_the_server_app_imports_no_torch():
    heavy = "{'torch', 'transformers', 'peft', 'opacus'}"
    probe = f"import sys, pfi_rag.federation.server_app; print(sorted({heavy} & set(sys.modules)))"

    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)

    assert done.stdout.strip() == "[]"


def test_an_adapter_written_from_arrays_loads_in_peft_with_those_weights(tmp_path, tiny_models_config):
    from peft import PeftModel

    from pfi_rag.models.loading import load_generator
    from pfi_rag.models.lora import lora_arrays

    # Prepare: the template, and new values for the A matrices only (as FedSA shares them).
    cfg = Config(data_root=tmp_path, models=tiny_models_config)
    template = write_template(cfg, tmp_path / "template")
    files = AdapterFiles(template)
    _, _, initial = fresh_adapter(cfg)
    shared = {name: value + 0.25 for name, value in initial.items() if ".lora_A." in name}

    # Execute: two saves, as two rounds write the global adapter.
    files.save(shared, tmp_path / "global", round=1, source="federated")
    info = files.save(shared, tmp_path / "global", round=2, source="federated")

    # Assert: PEFT's config as the template's, the new A and the untouched B, the next version.
    assert info.version == 2 and read_adapter_info(tmp_path / "global").round == 2
    config = json.loads((tmp_path / "global" / "adapter_config.json").read_text())
    assert config == json.loads((template / "adapter_config.json").read_text())
    written = read_adapter_arrays(tmp_path / "global")
    assert sorted(written) == sorted(initial)
    for name, value in initial.items():
        np.testing.assert_array_equal(written[name], shared.get(name, value))
    base, _, _ = load_generator(tiny_models_config)
    loaded = lora_arrays(PeftModel.from_pretrained(base, str(tmp_path / "global")))
    for name, value in written.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert (tmp_path / "global" / WEIGHTS).is_file()
