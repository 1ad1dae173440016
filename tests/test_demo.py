"""The one-command demo and the default-components rule, on a tiny model."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_base, make_tiny_tokenizer

from spaf_edge.cli.demo import command as demo_command
from spaf_edge.core.config import SpAFConfig
from spaf_edge.core.errors import ModelNotFoundError
from spaf_edge.model import SpAFModel
from spaf_edge.models import loading
from spaf_edge.models.loading import SHIPPED_COMPONENTS, resolve_components

pytestmark = pytest.mark.usefixtures("single_thread")


def test_components_default_to_the_shipped_ones_only_for_the_default_base(tmp_path):
    shipped = str(SHIPPED_COMPONENTS) if (SHIPPED_COMPONENTS / "spaf_config.json").is_file() else None
    assert resolve_components("default", None) == shipped
    assert resolve_components(None, None) == shipped
    assert resolve_components(tmp_path, None) is None  # another base: untrained unless given
    assert resolve_components("default", "none") is None
    assert resolve_components("default", "NONE") is None
    assert resolve_components(tmp_path, tmp_path / "ckpt") == str(tmp_path / "ckpt")


@pytest.fixture(scope="module")
def exportable_model_dir(tmp_path_factory):
    """A saved tiny Llama folder whose head_dim (16) ONNX Runtime's attention accepts."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_base("llama", hidden_size=64, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("exportable")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def trained_checkpoint(exportable_model_dir, tmp_path):
    model = SpAFModel.from_pretrained(exportable_model_dir, SpAFConfig(cutoff_layer=1, num_draft_tokens=3,
                                                                  serial_parallel_transition=1))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.spaf_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.save_spaf_components(tmp_path / "ckpt")


def test_demo_exports_generates_and_reports_a_lossless_speedup(exportable_model_dir, trained_checkpoint, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("SPAF_EDGE_CACHE", str(tmp_path / "cache"))
    args = ["--base-model", exportable_model_dir, "--components", trained_checkpoint, "--prompt", "Hi there",
            "--max-new-tokens", 16, "--threads", 1]
    result = CliRunner().invoke(demo_command, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    assert "tokens identical: yes" in result.stderr and "lossless on this device: exact" in result.stderr
    assert "speedup" in result.stderr and "tau" in result.stderr
    def cached_exports():  # the build folders; hidden entries are their build locks
        return sorted(p for p in (tmp_path / "cache" / "exports").iterdir() if not p.name.startswith("."))

    exports = cached_exports()
    assert len(exports) == 1  # exported once ...
    again = CliRunner().invoke(demo_command, [str(arg) for arg in args])
    assert again.exit_code == 0, again.output
    assert cached_exports() == exports  # ... and reused


def test_demo_without_components_says_how_to_get_them(tiny_model_dir, monkeypatch):
    from spaf_edge.bench.demo import run_demo

    monkeypatch.setattr(loading, "SHIPPED_COMPONENTS", tiny_model_dir / "absent")
    with pytest.raises(ModelNotFoundError, match="--components"):
        run_demo(base_model=str(tiny_model_dir), say=lambda line: None)
