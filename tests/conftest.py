"""Real LoRA files for the tests, written by peft, diffusers and pyarrow themselves.

One fine-tune (a tiny diffusers UNet and a tiny CLIP text encoder, wrapped by peft with random
`lora_B` so ΔW ≠ 0) is saved in every published layout; tests then check that all layouts read
back to the same canonical layers and the ΔW that peft itself computes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from dsire.lora.names import canonical_path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """A script of the repository (`train.py`, `predict.py`, `tests/...`) run as users run it, from the root.

    The user's W&B settings are left out (runs must work without them), and the checkout comes first
    on the import path, so a script run by path imports this checkout's `dsire`.
    """
    environment = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | (env or {})
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def run_job(script: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """An analysis job (`audit.py`, `attribute.py`) with its caches and runs under `tmp_path`, CSV logging only."""
    paths = (f"paths.cache_dir={tmp_path}/cache", f"paths.log_dir={tmp_path}/logs")
    return run_script(script, *paths, "logger=csv", *overrides)


def run_dir(tmp_path: Path, name: str) -> Path:
    """The one run directory of the job `name` (its `task_name`) that `run_job` made under `tmp_path`."""
    (directory,) = (tmp_path / "logs" / name / "runs").iterdir()
    return directory


def bundled_zoo_copy(directory: Path, concepts: tuple[str, ...], sizes: tuple[int, ...]) -> list[str]:
    """Copy the bundled zoo's LoRAs of `concepts` × `sizes` into `directory`; their manifest lines, header first."""
    rows = ["path,n,concept"]
    for concept in concepts:
        for n in sizes:
            name = f"{concept}_n{n}_r0_step200.safetensors"
            (directory / name).write_bytes((ROOT / "data" / "zoo" / name).read_bytes())
            rows.append(f"{name},{n},{concept}")
    return rows


def run_dsire(*args: str) -> subprocess.CompletedProcess:
    """The `dsire` command line (`python -m dsire ...`)."""
    return subprocess.run([sys.executable, "-m", "dsire", *args], capture_output=True, text=True, timeout=120)


def tiny_unet(layers_per_block: int = 1) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=layers_per_block,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_clip() -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=40,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=99,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


@dataclass
class FineTune:
    """A peft-wrapped model whose LoRA is non-zero, with what is needed to save it."""

    model: PeftModel
    config: LoraConfig
    component: str

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """Keys as diffusers training scripts save them (`get_peft_model_state_dict` of the bare model)."""
        return {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(self.model).items()}

    def deltas(self) -> dict[str, torch.Tensor]:
        """peft's own ΔW per canonical layer name, flattened like ours ([out, in·kh·kw]), float64."""
        result = {}
        for name, module in self.model.base_model.model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                delta = module.get_delta_weight("default").double()
                result[canonical_path(f"{self.component}.{name}")] = delta.reshape(delta.shape[0], -1)
        return result


def make_finetune(model: torch.nn.Module, config: LoraConfig, component: str, seed: int = 1) -> FineTune:
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return FineTune(peft_model, config, component)


@pytest.fixture(scope="session")
def unet_finetune() -> FineTune:
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
        rank_pattern={"to_k": 2},
        alpha_pattern={"to_v": 3},
    )
    return make_finetune(tiny_unet(), config, "unet")


@pytest.fixture(scope="session")
def unet_finetune_alpha_r() -> FineTune:
    """A fine-tune with alpha = r (scale 1): the only kind old diffusers files can express."""
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    return make_finetune(tiny_unet(), config, "unet", seed=2)


@pytest.fixture(scope="session")
def clip_finetune() -> FineTune:
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    return make_finetune(tiny_clip(), config, "text_encoder", seed=3)


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.contiguous() for k, v in state.items()}


def write_peft(finetune: FineTune, directory: Path) -> Path:
    finetune.model.save_pretrained(directory)
    return directory


def write_diffusers(unet: FineTune, text: FineTune, directory: Path) -> Path:
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=unet.state,
        text_encoder_lora_layers=text.state,
        unet_lora_adapter_metadata=unet.config.to_dict(),
        text_encoder_lora_adapter_metadata=text.config.to_dict(),
    )
    return directory / "pytorch_lora_weights.safetensors"


def write_diffusers_old(unet: FineTune, text: FineTune, path: Path) -> Path:
    """`unet.*.to_q.lora.down.weight` and text-encoder `*.q_proj.lora_linear_layer.down.weight`."""
    state = {
        **prefixed(convert_state_dict_to_diffusers(unet.state), "unet"),
        **prefixed(convert_state_dict_to_diffusers(text.state), "text_encoder"),
    }
    save_file(state, str(path))
    return path


def write_attn_procs(unet: FineTune, path: Path) -> Path:
    """The oldest diffusers layout (`save_attn_procs`): `*.processor.to_q_lora.down.weight`, no prefix."""
    state = {}
    for key, value in convert_state_dict_to_diffusers(unet.state).items():
        key = key.replace(".to_out.0.lora.", ".processor.to_out_lora.")
        for proj in ("to_q", "to_k", "to_v"):
            key = key.replace(f".{proj}.lora.", f".processor.{proj}_lora.")
        state[key] = value.contiguous()
    save_file(state, str(path))
    return path


def write_kohya(unet: FineTune, text: FineTune | None, path: Path, metadata: dict | None = None) -> Path:
    """diffusers' kohya converter, then the true alpha per layer (the converter writes alpha = rank)."""
    state = prefixed(unet.state, "unet") | (prefixed(text.state, "text_encoder") if text else {})
    kohya = convert_state_dict_to_kohya(state)
    for finetune in (unet, text) if text else (unet,):
        for name, module in finetune.model.base_model.model.named_modules():
            if "default" in getattr(module, "lora_alpha", {}):
                prefix = "lora_unet" if finetune.component == "unet" else "lora_te1"
                key = f"{prefix}_{name.replace('.', '_')}.alpha"
                kohya[key] = torch.tensor(float(module.lora_alpha["default"]))
    save_file(kohya, str(path), metadata=metadata)
    return path


def write_lorawise(finetunes: list[tuple[FineTune, int, str]], path: Path, nested: bool = False) -> Path:
    """Rows in the LoRA-WiSE schema: label, name, one float64 list per `unet.*.lora.down/up.weight`."""
    columns: dict[str, list] = {"label": [], "name": []}
    for finetune, label, concept in finetunes:
        columns["label"].append(label)
        columns["name"].append(concept)
        for key, value in prefixed(convert_state_dict_to_diffusers(finetune.state), "unet").items():
            matrix = value.double()
            columns.setdefault(key, []).append(matrix.tolist() if nested else matrix.flatten().tolist())
    pq.write_table(pa.table(columns), path)
    return path


# Hostile inputs and faults: CI's output says how many the run tried and how many failed.
COUNTED_MARKERS = {"hostile": "hostile inputs", "fault": "faults"}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per marker: inputs tried (a test's `inputs` user property, else 1), and test outcomes.

    A test counts as failed if any phase failed (a fixture's teardown check, such as the canary,
    included), as skipped if it was skipped, else as passed; parametrised cases count one by one.
    """
    tests: dict[str, dict[str, list[pytest.TestReport]]] = {marker: {} for marker in COUNTED_MARKERS}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if isinstance(report, pytest.TestReport):
                for marker in COUNTED_MARKERS:
                    if marker in report.keywords:
                        tests[marker].setdefault(report.nodeid, []).append(report)
    if not any(tests.values()):
        return
    terminalreporter.write_sep("=", "hostile inputs and faults")
    for marker, label in COUNTED_MARKERS.items():
        outcomes = {"passed": 0, "failed": 0, "skipped": 0}
        inputs = 0
        for reports in tests[marker].values():
            phases = {report.outcome for report in reports}
            outcome = "failed" if "failed" in phases else "skipped" if "skipped" in phases else "passed"
            outcomes[outcome] += 1
            counts = [value for report in reports for name, value in report.user_properties if name == "inputs"]
            inputs += max(counts, default=1)
        summary = ", ".join(f"{count} {outcome}" for outcome, count in outcomes.items())
        terminalreporter.write_line(f"{label}: {inputs} tried in {len(tests[marker])} tests: {summary}")
