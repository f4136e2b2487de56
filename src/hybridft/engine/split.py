"""The base/adapter partition of a (peft-wrapped) model, computed once and checked.

- ``adapter``: what peft trains (the active adapter's tensors, ``modules_to_save`` copies
  such as a task head, prompt encoders, biases peft was told to train);
- ``base``: every pretrained weight the forward uses;
- ``inactive``: tensors the forward never reads: the originals that a ``modules_to_save``
  copy shadows, and the tensors of adapters that are loaded but not active.

The split is structural: peft's own containers are visited (tuner layers'
``adapter_layer_names``, auxiliary wrappers, the prompt encoder), never parameter names,
and never ``requires_grad`` alone (peft freezes the base, which is exactly the ZO set).
The three groups are checked to be disjoint and to cover every parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

PEFT_SEGMENTS = (".base_layer", ".original_module")


@dataclass(frozen=True)
class Partition:
    """Parameters by role, each keyed by its canonical name (see ``canonical_name``)."""

    base: dict[str, nn.Parameter]
    adapter: dict[str, nn.Parameter]
    inactive: dict[str, nn.Parameter]


def canonical_name(name: str, prefix: str | None = None) -> str:
    """The name a parameter has in the plain ``transformers`` model, without peft's wrapping:
    ``base_model.model.bert.x.query.base_layer.weight`` -> ``bert.x.query.weight``. ``prefix``:
    where that model sits in the peft model (:func:`plain_prefix`); default ``base_model.model.``
    (a tuner such as LoRA), else ``base_model.``."""
    for start in (prefix,) if prefix is not None else ("base_model.model.", "base_model."):
        if name.startswith(start):
            name = name[len(start) :]
            break
    for segment in PEFT_SEGMENTS:
        name = name.replace(segment, "")
    return name


def plain_prefix(model: nn.Module) -> str | None:
    """Where the plain transformers model sits in the peft model ``model``, found structurally:
    ``base_model.model.`` under a tuner (LoRA, IA3), ``base_model.`` under prompt learning (where
    ``base_model.model.`` would cut a Llama's own ``model.``); None if ``model`` is no peft model."""
    get_base_model = getattr(model, "get_base_model", None)
    if not callable(get_base_model):
        return None
    plain = get_base_model()
    return next((f"{name}." for name, module in model.named_modules() if module is plain and name), None)


def _container(module: nn.Module, dotted: str) -> nn.Module | None:
    try:
        return module.get_submodule(dotted)
    except AttributeError:
        return None


def _peft_owned(model: nn.Module) -> tuple[set[nn.Parameter], set[nn.Parameter], set[nn.Parameter]]:
    """(active adapter tensors, inactive adapter tensors, shadowed originals), structurally."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    active: set[nn.Parameter] = set()
    inactive: set[nn.Parameter] = set()
    shadowed: set[nn.Parameter] = set()
    for module in model.modules():
        if not isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            continue
        names = set(module.active_adapters) if not getattr(module, "disable_adapters", False) else set()
        for attr in module.adapter_layer_names:
            container = _container(module, attr)
            if container is None:
                continue
            for adapter_name, sub in _items(container):
                (active if adapter_name in names else inactive).update(_params(sub))
        if isinstance(module, ModulesToSaveWrapper) and names:
            shadowed.update(module.original_module.parameters())
    prompt_encoder = getattr(model, "prompt_encoder", None)
    if isinstance(prompt_encoder, nn.Module):
        active.update(prompt_encoder.parameters())
    return active, inactive, shadowed


def peft_created(model: nn.Module) -> set[nn.Parameter]:
    """Parameters that peft added to the model (every adapter's tensors, active or not)."""
    active, inactive, _ = _peft_owned(model)
    return active | inactive


def _items(container: nn.Module) -> list[tuple[str, object]]:
    if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
        return list(container.items())
    return []


def _params(item: object) -> list[nn.Parameter]:
    if isinstance(item, nn.Parameter):
        return [item]
    if isinstance(item, nn.Module):
        return list(item.parameters())
    return []


def split(model: nn.Module) -> Partition:
    """Partition a model's parameters into base / adapter / inactive (see module docstring).

    A model with no peft wrapping is all base. Parameters that peft marked trainable outside
    its containers (for example LoRA's ``bias="all"``) are adapter parameters: peft trains
    them, so the FO rule owns them.
    """
    active, inactive_peft, shadowed = _peft_owned(model)
    prefix = plain_prefix(model)
    groups: dict[str, dict[str, nn.Parameter]] = {"base": {}, "adapter": {}, "inactive": {}}
    for name, param in model.named_parameters(remove_duplicate=True):
        if param in active:
            group = "adapter"
        elif param in inactive_peft or param in shadowed:
            group = "inactive"
        elif active and param.requires_grad:
            group = "adapter"
        else:
            group = "base"
        key = canonical_name(name, prefix) if group == "base" else name
        if key in groups[group]:
            raise ValueError(f"two {group} parameters share the name {key!r}")
        groups[group][key] = param
    partition = Partition(**groups)
    check(model, partition)
    return partition


def check(model: nn.Module, partition: Partition) -> None:
    """Raise unless the groups are disjoint and together hold every parameter of ``model``."""
    groups = {"base": partition.base, "adapter": partition.adapter, "inactive": partition.inactive}
    owner: dict[nn.Parameter, str] = {}
    for group, params in groups.items():
        if len(set(params.values())) != len(params):
            raise ValueError(f"the {group} group lists one parameter under two names")
        for param in params.values():
            if param in owner:
                raise ValueError(f"a parameter is in both the {owner[param]} and the {group} group")
            owner[param] = group
    missing = [n for n, p in model.named_parameters() if p not in owner]
    if missing:
        raise ValueError(f"{len(missing)} parameters are in no group, e.g. {missing[0]}")
