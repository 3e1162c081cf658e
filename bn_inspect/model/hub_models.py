"""A model folder -> nn.Module: the architecture built from config.json by transformers or timm, the weights loaded into it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bn_inspect.errors import ModelFileError
from bn_inspect.model.hub import CONFIG_NAME, check_remote_code, read_config, read_folder_weights, sample_shape
from bn_inspect.model.state_dict import load_state_into, owner_prefix, under_prefix

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class FolderModel:
    """A model built from a folder.

    ``format`` is ``huggingface`` (transformers) or ``timm``; ``sample_shape`` the input one sample
    takes according to the config; ``sha256`` that of the weights file; ``notes`` what a user
    should know about how it was built.
    """

    module: nn.Module
    format: str
    sample_shape: tuple[int, ...]
    sha256: str
    notes: tuple[str, ...]


def load_model_folder(folder: Path, *, trust_remote_code: bool = False, map_location: str = "cpu") -> FolderModel:
    """Build the folder's model from its config.json and load its weights, in eval mode as ``from_pretrained`` leaves it.

    Raises:
        ModelFileError, RemoteCodeError, UntrustedPickleError, StateDictMismatchError.
    """
    config = read_config(folder)
    if "architecture" in config and "model_type" not in config:
        module, described, library = _timm_model(folder, config), f"timm's {config['architecture']}", "timm"
    else:
        check_remote_code(folder, config, trust_remote_code)
        module = _transformers_model(folder, config)
        described, library = f"the {type(module).__name__} that {CONFIG_NAME} describes", "huggingface"
    state_dict, digest = read_folder_weights(folder, map_location)
    notes: tuple[str, ...] = ()
    prefix = owner_prefix(list(state_dict), list(module.state_dict()))
    if prefix is not None:
        state_dict = under_prefix(state_dict, prefix)
        notes = (f"note: the weights of {folder} fit {described} under the prefix {prefix!r}, which was stripped.",)
    load_state_into(
        module, state_dict, "", target=described, fix="Check that the weights and config.json come from the same save"
    )
    return FolderModel(module.eval().to(map_location), library, sample_shape(config), digest, notes)


def _transformers_model(folder: Path, config_dict: dict[str, Any]) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise ModelFileError(
            f"{folder} is a Hugging Face model folder, and building its model needs transformers",
            "pip install 'bn-inspect[hf]'",
        ) from None
    # Built from the config alone (no from_pretrained, no hub call): nothing can be downloaded. The
    # hub's HF_HUB_OFFLINE is not set for it: huggingface_hub reads it once, at its first import, so
    # it would stay set for the rest of a Python API user's process.
    if config_dict.get("auto_map") is not None:  # check_remote_code let it through: trusted
        config, model_class = _remote_classes(folder, config_dict)
    else:
        config = _known_config(folder, config_dict, transformers.__version__)
        model_class = _named_class(config, transformers)
    try:
        if model_class is not None:
            return model_class(config)  # type: ignore[no-any-return]
        return _auto_model(config)
    except Exception as error:
        raise ModelFileError(
            f"model folder {folder}: transformers cannot build a model from {CONFIG_NAME} "
            f"({type(error).__name__}: {str(error)[:160]})",
            "Check config.json, or re-save the model with save_pretrained",
        ) from error


def _known_config(folder: Path, config_dict: dict[str, Any], version: str) -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        shown = repr(model_type)[:60]
        raise ModelFileError(
            f"model folder {folder}: {CONFIG_NAME} gives model_type {shown}, which transformers {version} does not know",
            "Upgrade transformers, or check that the folder was written by save_pretrained",
        )
    try:
        return CONFIG_MAPPING[model_type].from_dict(config_dict)
    except Exception as error:
        raise ModelFileError(
            f"model folder {folder}: {CONFIG_NAME} is not a valid {model_type} config ({type(error).__name__})",
            "Re-save the model with save_pretrained",
        ) from error


def _named_class(config: Any, transformers: Any) -> Any:
    """The model class the config's ``architectures`` names, where transformers has it for this config; else None."""
    for name in getattr(config, "architectures", None) or ():
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            continue
        model_class: Any = getattr(transformers, name, None)
        is_model = isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)
        if is_model and isinstance(config, getattr(model_class, "config_class", ())):
            return model_class
    return None


def _auto_model(config: Any) -> nn.Module:
    import transformers

    # The auto classes are untyped: reached through Any.
    auto: Any = transformers
    try:
        module: nn.Module = auto.AutoModelForImageClassification.from_config(config)
    except ValueError:  # no classification head for this config: the bare model
        module = auto.AutoModel.from_config(config)
    return module


def _remote_classes(folder: Path, config_dict: dict[str, Any]) -> tuple[Any, Any]:
    """The config and model classes of the folder's own code (``auto_map``), imported from the folder only."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    auto_map = config_dict["auto_map"]
    references = auto_map if isinstance(auto_map, dict) else {}
    config_ref = references.get("AutoConfig")
    model_ref = references.get("AutoModelForImageClassification") or references.get("AutoModel")
    if not isinstance(config_ref, str) or not isinstance(model_ref, str):
        raise ModelFileError(
            f"model folder {folder}: {CONFIG_NAME}'s auto_map names no AutoConfig and AutoModel classes",
            "Re-save the model with save_pretrained",
        )
    try:
        config_class: Any = get_class_from_dynamic_module(config_ref, str(folder), local_files_only=True)
        model_class = get_class_from_dynamic_module(model_ref, str(folder), local_files_only=True)
        config = config_class.from_dict(config_dict)
    except Exception as error:
        raise ModelFileError(
            f"model folder {folder}: its own code cannot be imported ({type(error).__name__}: {str(error)[:160]})",
            "Check the folder's Python files",
        ) from error
    return config, model_class


def _timm_model(folder: Path, config: Mapping[str, Any]) -> nn.Module:
    name = config["architecture"]
    try:
        import timm
    except ImportError:
        raise ModelFileError(
            f"{folder} is a timm model folder ({CONFIG_NAME} names architecture {str(name)[:60]!r}), "
            "and building its model needs timm",
            "pip install timm",
        ) from None
    if not isinstance(name, str) or not timm.is_model(name):
        raise ModelFileError(
            f"model folder {folder}: {CONFIG_NAME} names architecture {repr(name)[:60]}, which timm "
            f"{timm.__version__} does not know",
            "Upgrade timm, or check the folder",
        )
    kwargs = dict(_plain_kwargs(folder, config.get("model_args", {})))
    num_classes = config.get("num_classes")
    if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 0:
        kwargs["num_classes"] = num_classes
    try:
        module: nn.Module = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as error:
        raise ModelFileError(
            f"model folder {folder}: timm cannot build {name} from {CONFIG_NAME} ({type(error).__name__}: "
            f"{str(error)[:160]})",
            "Check config.json's model_args",
        ) from error
    return module


def _plain_kwargs(folder: Path, model_args: object) -> dict[str, Any]:
    """timm's ``model_args``: keyword arguments for the model's constructor, plain JSON values only."""
    plain = (str, int, float, bool, type(None), list)
    if not isinstance(model_args, dict) or not all(
        isinstance(key, str) and key.isidentifier() and isinstance(value, plain) for key, value in model_args.items()
    ):
        raise ModelFileError(
            f"model folder {folder}: {CONFIG_NAME}'s model_args is not an object of plain values",
            "Check config.json",
        )
    return model_args
