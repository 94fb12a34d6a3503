"""A PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) for an exported HF
base: what `peft.PeftModel.from_pretrained(base, dir)` and servers (vLLM's `--enable-lora`) load.

The adapter tensors come as PEFT's `get_peft_model_state_dict` names them on our native model
(`language_model.backbone.layers.3.mixer.q_proj.lora_A.weight`); each module path is renamed as the
mapping table renames that module's weight (`train.hf.mapping.native_key_to_hf`: the name on disk),
then as transformers renames that weight when it loads the model (its conversion mapping: NemotronH's
`backbone.` is `model.` in memory from transformers 5), under the `base_model.model.` prefix a
`PeftModel` gives its base: the names `PeftModel.save_pretrained` itself writes for that model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from train.config.schema import PeftConfig
from train.hf.errors import ConversionError
from train.hf.mapping import Layout, native_key_to_hf

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def hf_module_name(native_module: str, layout: Layout) -> str:
    """Our module path -> the exported base's (the path of its `.weight`, renamed as the table says)."""
    return native_key_to_hf(f"{native_module}.weight", layout).removesuffix(".weight")


def loaded_module_names(export_dir: Path, layout: Layout, disk_names: list[str]) -> dict[str, str]:
    """{on-disk module name: the name of that module in the model transformers builds from `export_dir`}
    (the model built on the meta device: no memory; a name it does not rename maps to itself)."""
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    config = transformers.AutoConfig.from_pretrained(export_dir)
    auto = transformers.AutoModelForCausalLM if layout == "lm" else transformers.AutoModelForImageTextToText
    with torch.device("meta"):
        model = auto.from_config(config)
    modules = {name for name, _ in model.named_modules()}
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    names = {}
    for disk in disk_names:
        key = f"{disk}.weight"
        for renaming in renamings:
            key, _ = renaming.rename_source_key(key)
        loaded = key.removesuffix(".weight")
        names[disk] = loaded if loaded in modules else disk
    return names


def split_adapter_key(key: str) -> tuple[str, str]:
    """`a.b.q_proj.lora_A.weight` -> (`a.b.q_proj`, `lora_A.weight`)."""
    module, sep, rest = key.partition(".lora_")
    if not sep:
        raise ValueError(f"{key} is not an adapter tensor")
    return module, "lora_" + rest


def write_peft_adapter(dst: Path, adapter_state: dict[str, Tensor], modules: list[str], cfg: PeftConfig,
                       layout: Layout, base_model: str, dtype: torch.dtype | None = None) -> dict:
    """Write the adapter directory `dst` for the base exported at `base_model`; `modules`: the adapted
    native module names. Returns a summary."""
    from peft import LoraConfig

    if layout == "lm":  # an LM export holds the language model only
        modules = [m for m in modules if m.startswith("language_model.")]
    mamba_out = [m for m in modules if m.endswith(".mixer.out_proj")]
    if mamba_out:
        # transformers' Mamba kernel path reads out_proj.weight directly, bypassing an adapter: PEFT refuses
        # adapters there for Mamba models. Merged weights carry them.
        raise ConversionError(f"peft.targets includes mamba_out_proj ({len(mamba_out)} modules, e.g. {mamba_out[0]}): "
                              "PEFT refuses adapters on a Mamba out_proj in transformers models; export with --merge "
                              "instead, or train without that role")
    loaded = loaded_module_names(Path(base_model), layout, [hf_module_name(m, layout) for m in modules])
    tensors = {}
    for key, tensor in adapter_state.items():
        module, rest = split_adapter_key(key)
        if module not in modules:
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[f"{PEFT_PREFIX}{loaded[hf_module_name(module, layout)]}.{rest}"] = tensor
    targets = sorted(loaded[hf_module_name(m, layout)] for m in modules)
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        use_dora=cfg.method == "dora", bias="none",
                        task_type="CAUSAL_LM" if layout == "lm" else None, base_model_name_or_path=base_model)
    dst.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(dst))
    save_file(tensors, str(dst / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    written = json.loads((dst / ADAPTER_CONFIG).read_text())
    return {"dir": str(dst), "tensors": len(tensors), "target_modules": len(written["target_modules"]),
            "method": cfg.method}
